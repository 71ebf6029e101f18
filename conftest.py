"""pytest's root conftest: `python -m pytest` also runs the package's docstring examples
(`--doctest-modules` over `precision_doctor`, see pyproject.toml). The Streamlit app only
runs as `__main__`, so importing it is safe, but it imports streamlit (the `app` extra):
without streamlit, doctest collection leaves it out."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("streamlit") else ["precision_doctor/views/streamlit_app.py"]

"""pytest's root conftest: `python -m pytest` also runs the package's docstring examples
(`--doctest-modules` over `precision_doctor`, see pyproject.toml). These scripts run the
Streamlit app when imported, so doctest collection must never import them."""

collect_ignore = ["precision_doctor/views/streamlit_app.py", "app/streamlit_app.py"]

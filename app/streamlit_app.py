"""Thin entry for `streamlit run app/streamlit_app.py -- report.json` from a source checkout:
the app itself ships inside the package (`precision_doctor/views/streamlit_app.py`), so a
wheel install runs the same script through `precision-doctor app report.json`. Streamlit
runs this file as `__main__`; importing it does nothing."""

import runpy

if __name__ == "__main__":
    runpy.run_module("precision_doctor.views.streamlit_app", run_name="__main__")

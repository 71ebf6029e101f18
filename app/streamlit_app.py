"""Thin entry for `streamlit run app/streamlit_app.py -- report.json` from a source checkout:
the app itself ships inside the package (`precision_doctor/views/streamlit_app.py`), so a
wheel install runs the same script through `precision-doctor app report.json`."""

import runpy

runpy.run_module("precision_doctor.views.streamlit_app", run_name="__main__")

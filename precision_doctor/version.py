"""The package version: one place, read by pyproject.toml and the report's environment."""

__version__ = "0.1.0"

"""The two exception classes: user errors (one line, exit 2) and our own bugs."""

from __future__ import annotations


class PrecisionDoctorError(Exception):
    """Bad input or a model that cannot be analyzed: the CLI prints one line, exits 2."""


class PrecisionDoctorInternalError(Exception):
    """A bug in precision-doctor itself; the message says how far the analysis got."""

"""The base of every saved document (report, plan, pre-flight, monitor file) and the one way
they are read back: text from a file, parsed as JSON, validated against a pydantic model,
every failure one line (`PrecisionDoctorError`) that names the file and the first field
that does not fit. Nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from precision_doctor.errors import PrecisionDoctorError


class Frozen(BaseModel):
    """Immutable, no unknown fields, infinities written as "Infinity" (strict JSON has no
    literal for them) and read back as floats: a document saved and loaded compares equal."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings", extra="forbid")


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: object, what: str) -> M:
    """`data` (JSON text, or parsed JSON / Python values) as a `model`. A mismatch is one
    line: `{what} at {field.path}: {pydantic's message}`, for the first error only."""
    try:
        if isinstance(data, (str, bytes)):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        at = f" at {where}" if where else ""
        raise PrecisionDoctorError(_one_line(f"{what}{at}: {first['msg']}")) from None
    except PrecisionDoctorError as e:  # a check of our own inside a field (Thresholds)
        raise PrecisionDoctorError(_one_line(f"{what}: {e}")) from None


def parse_json(text: str, source: str) -> object:
    try:
        parsed: object = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrecisionDoctorError(f"{source} is not valid JSON (truncated or corrupt?): {e}") from None
    return parsed


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The file's text; a missing or unreadable file is one line naming `what` it should be."""
    p = Path(path)
    if p.is_dir():
        raise PrecisionDoctorError(f"{what} {p} is a directory, not a file")
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrecisionDoctorError(f"{what} {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrecisionDoctorError(f"{what} {p} cannot be read: {e}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))

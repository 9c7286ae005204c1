"""What every record shares: parsed once from JSON into a typed object (pydantic), written back
with the same keys it was given, and a damaged file named with its field in one line.

A record keeps the keys it was built or read with: a field never set is not written (``None``
set on purpose is written as ``null``), and keys this version does not know (written by a newer
one) are kept and written back unchanged. A required field that is missing, or a value of the
wrong type, raises :class:`RecordError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kolors_story.errors import UserError

R = TypeVar("R", bound="Record")


class RecordError(UserError, ValueError):
    """A record file (manifest, scores, metrics line, plan, best.yaml) lacks a field or holds a
    value of the wrong type; the message names the file and the field."""


def finite(value: Any) -> Any:
    """JSON cannot hold NaN/Inf: they are written as null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class Record(BaseModel):
    """Base of every on-disk record: ``from_json`` / ``to_json`` and ``read`` / ``write``."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), arbitrary_types_allowed=True)
    ALWAYS: ClassVar[tuple[str, ...]] = ()  # fields written even when left at their default (e.g. ``type``)

    def model_post_init(self, _context: Any) -> None:
        self.__pydantic_fields_set__.update(self.ALWAYS)

    @classmethod
    def from_json(cls: type[R], data: Any, *, source: str | Path = "record") -> R:
        """The record in ``data`` (a parsed JSON object); ``source`` names it in errors."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise RecordError(f"{source}: expected a JSON object for a {cls.__name__}, found {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            what = "is missing" if first["type"] == "missing" else f"is not valid ({first['msg']})"
            raise RecordError(f"{source}: field '{where}' {what}; the file is damaged or was not written by "
                              "kolors-story") from None

    def to_json(self) -> dict:
        """Plain JSON data with the keys this record was built or read with (NaN/Inf as null)."""
        data = self.model_dump(mode="python", exclude_unset=True)
        return finite({**{k: data[k] for k in self.ALWAYS if k in data}, **data})  # e.g. ``type`` first

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """The record in the JSON file ``path``; an unreadable file raises :class:`RecordError`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordError(f"{path} cannot be read as JSON ({err})") from None
        return cls.from_json(data, source=path)

    def write(self, path: str | Path) -> Path:
        """Write the record as JSON, atomically (temp file, then rename)."""
        from kolors_story.files import atomic_write_json

        return atomic_write_json(Path(path), self.to_json())

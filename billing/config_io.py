"""Reading billing config files and turning pydantic errors into ConfigError (file + field)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from billing.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> Any:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"not valid YAML: {exc}") from exc


def validate(model: type[M], data: Any, file: str) -> M:
    """Validate ``data`` with ``model``; the first error becomes a ConfigError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        more = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
        raise ConfigError(file, field, f"{first['msg']}{more}") from exc


def decimal_text(value: Any) -> Any:
    """Refuse YAML floats for money/rates: they are written as quoted strings or integers."""
    if isinstance(value, float):
        raise ValueError(f"write {value!r} as a quoted string (exact decimal), not a YAML float")
    return value

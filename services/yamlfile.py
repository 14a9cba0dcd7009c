"""Reading a YAML file into a pydantic model, with errors that name the file and the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def load_model(cls: type[M], path: str | Path | None, *, default: tuple[str, str] | None = None,
               error: type[ValueError] = ValueError, what: str = "file") -> M:
    """``path`` parsed as ``cls``; with no path, the packaged ``default`` (package, file name).

    Every failure (unreadable, not YAML, not a mapping, invalid fields) raises ``error`` with one line that
    says where and what, never a traceback.
    """
    if path is None:
        if default is None:
            raise error(f"no {what} given")
        text, where = resources.files(default[0]).joinpath(default[1]).read_text(), f"default {what}"
    else:
        try:
            text, where = Path(path).read_text(), str(path)
        except OSError as e:
            raise error(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping of settings")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise error(f"{where}: {problems}") from None

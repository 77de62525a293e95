"""A TOML file of the admin's (or the packaged default) read into a Pydantic model, with
one readable line for whatever is wrong with it: the prefilter rules, the labelled
examples."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from layers.errors import UserError

M = TypeVar("M", bound=BaseModel)


def load(path: Path | None, packaged: str, model: type[M], error: type[UserError],
         what: str) -> M:
    """``path`` (or the package's ``packaged`` file, e.g. ``rules/default.toml``) as
    ``model``; ``error`` with ``what``, the file and the first problem otherwise."""
    where = str(path) if path else f"packaged {packaged}"
    try:
        if path is None:
            text = resources.files("layers").joinpath(packaged).read_text("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        return model.model_validate(tomllib.loads(text))
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {where}: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise error(f"{what} {where}: {loc}: {err['msg']}") from exc

"""A site's own code named by import path: ``"package.module:attribute"``.

A model or trainer name holding a colon is an import path. The coordinator imports what its
own config names. A silo imports a path only when its own command line allows it
(``lssfl silo --allow-plugin PATH``): the names in a task come over the network, and
importing a module runs its code, so a silo never imports a path on a peer's word alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from typing import Any


class PluginNotAllowed(ValueError):
    """A task names an import path that this silo's command line does not allow."""


def is_import_path(name: str) -> bool:
    """True for ``"package.module:attribute"`` names (the built-in names hold no colon)."""
    return ":" in name


def check_allowed(name: str, allowed: Collection[str], what: str) -> None:
    """PluginNotAllowed, one line, when ``name`` is an import path not in ``allowed``."""
    if is_import_path(name) and name not in allowed:
        shown = name if len(name) <= 200 else name[:200] + "..."
        raise PluginNotAllowed(
            f"the coordinator asks for {what} {shown!r}, which this silo does not allow "
            f"(start it with --allow-plugin {shown} to run that code)"
        )


def load_import_path(path: str, what: str) -> Callable[..., Any]:
    """The callable ``path`` names; ValueError, one line, naming what is wrong."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {path!r}: an import path is 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"{what} {path!r}: module {exc.name!r} not found (is it installed or on PYTHONPATH?)"
        ) from None
    except Exception as exc:  # the site's code may raise anything while it is imported
        raise ValueError(
            f"{what} {path!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {path!r}: {attribute} is not callable (a {type(obj).__name__!r})")
    return obj

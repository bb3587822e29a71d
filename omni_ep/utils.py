"""Import an object by its dotted qualified name (the platform registry stores names, not classes)."""

from __future__ import annotations

import importlib


def resolve_obj_by_qualname(qualname: str):
    """``"package.module.Name"`` -> the object. Raises ImportError / AttributeError naming what failed."""
    module_name, _, obj_name = qualname.rpartition(".")
    if not module_name:
        raise ValueError(f"{qualname!r} is not a qualified name of the form 'package.module.Name'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, obj_name)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no attribute {obj_name!r} (from {qualname!r})") from None

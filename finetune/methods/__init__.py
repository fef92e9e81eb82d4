"""Fine-tuning methods, one file each; :data:`REGISTRY` maps ``method=<name>`` to the class.

A method file defines its config dataclass and a :class:`finetune.methods.base.SegMethod` subclass decorated with
:func:`register`; importing this package imports every module of the folder (except the shared ``base`` and
``common``), so a new file is all a new method needs.
"""

from __future__ import annotations

from common.method import MethodRegistry

__all__ = ["REGISTRY", "register", "methods_for"]

REGISTRY = MethodRegistry()
register = REGISTRY.register


def methods_for(task: str) -> dict[str, type]:
    """``{name: class}`` of the methods an entry script offers (``semisup`` or ``uda``), in registration order."""
    return {name: cls for name, cls in REGISTRY.items() if task in getattr(cls, "tasks", ())}


def _import_all() -> None:
    """Import every method file of this package (each registers its method)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "common"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

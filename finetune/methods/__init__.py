"""Fine-tuning methods, one file each; :data:`REGISTRY` maps ``method=<name>`` to the class.

A method file defines its config dataclass and a :class:`finetune.methods.base.SegMethod` subclass decorated with
:func:`register`; importing this package imports every method file, so every name is known to the entry scripts.
"""

from __future__ import annotations

from common.method import MethodRegistry

__all__ = ["REGISTRY", "register", "methods_for"]

REGISTRY = MethodRegistry()
register = REGISTRY.register


def methods_for(task: str) -> dict[str, type]:
    """``{name: class}`` of the methods an entry script offers (``semisup`` or ``uda``), in registration order."""
    return {name: cls for name, cls in REGISTRY.items() if task in getattr(cls, "tasks", ())}


from finetune.methods import supervised  # noqa: E402,F401  (registers its method)

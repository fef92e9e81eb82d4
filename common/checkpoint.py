"""Atomic checkpoint files and run-directory layout.

Every file is written under a temporary name in the same directory and moved into place with ``os.replace``,
so a crash (or a non-finite loss) never leaves a half-written checkpoint behind: the previous one stays intact.
Files get the mode ``open()`` gives a new file, ``0666 & ~umask`` (0644 under the usual umask 022), whatever the
writer library used: safetensors creates its files 0600, which would hide exports and checkpoints from the group.
Training-state checkpoints are directories ``checkpoints/step_XXXXXXXX`` written by Accelerate's ``save_state``
into ``.tmp_step_XXXXXXXX`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINT_DIR",
    "default_file_mode",
    "apply_default_mode",
    "apply_default_modes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "load_safetensors",
    "step_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
]

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _current_umask() -> int:
    """The process umask, read without changing it where the system allows (``/proc/self/status`` on Linux);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """Permission bits of a new regular file under the current umask, as ``open()`` creates it: ``0o666 & ~umask``."""
    return 0o666 & ~_current_umask()


def apply_default_mode(path: str | os.PathLike) -> None:
    """Give a file the permission bits of :func:`default_file_mode` (for files a library created with others)."""
    os.chmod(path, default_file_mode())


def apply_default_modes(directory: str | os.PathLike) -> None:
    """:func:`apply_default_mode` on every regular file under ``directory`` (e.g. a training-state checkpoint
    written by Accelerate's ``save_state``, whose ``model.safetensors`` safetensors creates 0600)."""
    mode = default_file_mode()
    for root, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename), with the default file mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    apply_default_mode(tmp)  # a stale temp file of a crashed writer keeps its mode when reopened
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save a flat tensor dict with safetensors, atomically, with the default file mode (:func:`default_file_mode`).
    Tensors are made contiguous and detached."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    apply_default_mode(tmp)  # safetensors creates 0600
    os.replace(tmp, path)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return load_file(str(path))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete training-state checkpoints of a run, sorted by step."""
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt.is_dir():
        return []
    out = []
    for p in ckpt.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "engine_state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` most recent step checkpoints (and stale temporary directories)."""
    ckpts = list_checkpoints(run_dir)
    for _, p in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(p, ignore_errors=True)

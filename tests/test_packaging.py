"""`ssl/` must never shadow the standard library's ssl module; the DINO stage imports as `eo_ssl`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_init_in_ssl_folder():
    assert not (REPO / "ssl" / "__init__.py").exists()


def test_import_ssl_from_repo_root_is_stdlib():
    code = "import ssl, sys; print(ssl.__file__); ssl.create_default_context()"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip()).resolve()
    assert path.parent == Path(sysconfig.get_paths()["stdlib"]).resolve(), path
    # Also with the repository root explicitly first on sys.path (as `python -m` from the root does).
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    assert Path(out.stdout.strip()).resolve().parent == path.parent


def test_eo_ssl_maps_to_ssl_folder():
    import eo_ssl

    assert Path(list(eo_ssl.__path__)[0]).resolve() == (REPO / "ssl").resolve()


def test_pretrain_help_through_accelerate_launch():
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "ssl/pretrain.py", "--help"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--config" in out.stdout and "--output-dir" in out.stdout and "--resume" in out.stdout

"""``make demo`` runs ``scripts/demo.sh``: its smoke mode (``DEMO_QUICK=1``, every stage a few steps on a small demo
dataset) drives the script end to end, both lanes included, and the summary it prints reads every stage's metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO


@pytest.mark.slow
def test_demo_script_runs_every_stage(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    env = {**os.environ, "DEMO_QUICK": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), str(data), str(runs)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in range(1, 8):
        assert f"] {stage}/7 " in out.stdout, (stage, out.stdout)
    for run in ("pretrain", "finetune", "semisup", "uda_source_only", "uda_selftrain"):
        assert (runs / run / "checkpoints" / "last.safetensors").exists() or run == "pretrain", run
    assert (runs / "backbone.safetensors").exists() and len(list((runs / "predictions").glob("*.tif"))) == 4
    semi = json.loads((runs / "semisup" / "metrics.json").read_text())
    assert semi["method"] == "unimatch" and semi["steps"] == 4
    adapted = json.loads((runs / "uda_selftrain" / "metrics.json").read_text())
    # the adaptation run started from the demo's source-only run, and the summary quotes both target figures
    source = json.loads((runs / "uda_source_only" / "metrics.json").read_text())
    line = next(x for x in out.stdout.splitlines() if x.startswith("domain adaptation"))
    want = (f"source-only {source['last']['target_val/mIoU']:.2f} -> selftrain "
            f"{adapted['last']['target_val/mIoU']:.2f}")
    assert want in line, (want, line)
    assert re.search(r"supervised \d+\.\d\d -> unimatch \d+\.\d\d", out.stdout)


@pytest.mark.slow
def test_demo_script_reports_a_failing_stage(tmp_path):
    """A stage that fails in one lane stops the demo (the other lane too) with its log's last lines and a non-zero
    status."""
    env = {**os.environ, "DEMO_QUICK": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "SEMISUP_METHOD": "no_such_method"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), str(tmp_path / "data"), str(tmp_path / "runs")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2  # the stage's own status: bad input
    assert "---- failed (exit 2):" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "config error: 'method'" in out.stderr and "'no_such_method' is not valid" in out.stderr
    assert "demo: a stage failed" in out.stderr and "[lane B] domain adaptation" not in out.stdout


def test_demo_script_refuses_an_unknown_adaptation_method(tmp_path):
    """UDA_METHOD is checked before anything runs: one line naming the variable and the choices, status 2."""
    env = {**os.environ, "UDA_METHOD": "source_only", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), str(tmp_path / "data"), str(tmp_path / "runs")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: UDA_METHOD=source_only:") and "adaptsegnet, advent, proda" in out.stderr
    assert not (tmp_path / "data").exists() and out.stdout == ""


@pytest.mark.slow
def test_demo_script_runs_an_adversarial_method_from_the_export(tmp_path):
    """UDA_METHOD=advent follows the table's protocol: from the export with the auxiliary head, not from the
    source-only model; the summary names the method."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    env = {**os.environ, "DEMO_QUICK": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "UDA_METHOD": "advent"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), str(data), str(runs)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "7/7 [lane B] advent from the export" in out.stdout
    cfg = yaml.safe_load((runs / "uda_advent" / "config.yaml").read_text())
    assert cfg["method"] == "advent" and cfg["model"]["aux"] is True and cfg["model"]["init_from"] is None
    assert cfg["model"]["weights"] == str(runs / "backbone.safetensors")
    assert re.search(r"source-only \d+\.\d\d -> advent \d+\.\d\d", out.stdout)


def test_the_demo_follows_the_adaptation_tables_protocol():
    """scripts/demo.sh's adaptation stage mirrors bench/uda_demo.py: the methods it accepts, those it warm-starts
    from source-only and those it gives the auxiliary head. A change to the table's protocol must change the demo."""
    sys.path.insert(0, str(REPO / "bench"))
    import uda_demo

    script = (REPO / "scripts" / "demo.sh").read_text()
    rows = set(uda_demo.VARIANT_ROWS)  # table rows of a method with another option, not methods
    accepted = set(uda_demo.METHODS) - {"source_only"} - rows
    assert f"  {'|'.join(sorted(accepted))}) ;;" in script
    assert set(uda_demo.WARM_START) - rows == accepted - set(uda_demo.EXTRA)  # the case's default: from source-only
    assert {uda_demo.VARIANT_ROWS[r] for r in rows} <= set(uda_demo.METHODS)
    assert all(v == ["model.aux=true"] for v in uda_demo.EXTRA.values())
    assert f"    {'|'.join(sorted(uda_demo.EXTRA))}) uda_init=(\"$W\" model.aux=true)" in script

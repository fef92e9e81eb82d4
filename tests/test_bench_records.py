"""The results-table scripts (bench/semisup_demo.py, bench/uda_demo.py) resume from committed per-run records: a
record is reused only for the same config content, the same non-path overrides and the same starting weights."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import semisup_demo


@pytest.fixture
def job(tmp_path, monkeypatch) -> dict:
    monkeypatch.setattr(semisup_demo, "RESULTS", tmp_path / "results")
    config = tmp_path / "demo.yaml"
    config.write_text("trainer:\n  max_steps: 900\n")
    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"weights-v1")
    return {"name": "supervised", "init": "dino", "seed": 0, "out": str(tmp_path / "run"), "config": str(config),
            "record": "semisup/supervised_dino_s0", "script": "no/such/script.py",
            "overrides": ["data.root=/somewhere/s2/source", "method=supervised", "trainer.seed=0",
                          f"model.weights={weights}"]}


def _write_record(job: dict, last: float) -> Path:
    path = semisup_demo._record_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"last": {"step": 900, "mIoU": last}, "best": {"step": 600, "mIoU": last + 1}, "selection": "validation"}
    path.write_text(json.dumps({"args": semisup_demo._record_key(job), "metrics": metrics}))
    return path


def test_the_key_ignores_paths_but_not_content(job, tmp_path):
    key = semisup_demo._record_key(job)
    assert key["overrides"] == ["method=supervised", "trainer.seed=0"]
    assert len(key["config_content_sha256"]) == 64 and len(key["weights_sha256"]) == 64
    moved = {**job, "overrides": ["data.root=/elsewhere", *job["overrides"][1:]]}
    assert semisup_demo._record_key(moved) == key  # another machine's paths: the same run
    Path(job["config"]).write_text("# a comment\ntrainer:\n    max_steps: 900   # the layout changed, not a value\n")
    assert semisup_demo._record_key(job) == key  # the same recipe
    Path(job["config"]).write_text("trainer:\n  max_steps: 900\npsmt:\n  warmup_steps: 150\n")
    assert semisup_demo._record_key(job) == key  # another method's section: not read by a supervised run
    Path(job["config"]).write_text("trainer:\n  max_steps: 900\nsupervised:\n  x: 1\n")
    assert semisup_demo._record_key(job) != key  # its own method's section
    Path(job["config"]).write_text("trainer:\n  max_steps: 450\n")
    assert semisup_demo._record_key(job) != key  # another recipe
    Path(job["config"]).write_text("trainer:\n  max_steps: 900\n")
    Path(job["overrides"][-1].split("=", 1)[1]).write_bytes(b"weights-v2")
    assert semisup_demo._record_key(job) != key  # another export
    seed = {**job, "overrides": [o.replace("trainer.seed=0", "trainer.seed=1") for o in job["overrides"]]}
    assert semisup_demo._record_key(seed)["overrides"] != key["overrides"]


def test_a_matching_record_is_reused_and_a_stale_one_is_run_again(job):
    _write_record(job, 64.25)
    out = semisup_demo._run_script(job, threads=1)  # the script does not exist: reuse or fail
    assert out["last"]["mIoU"] == 64.25 and out["best"]["step"] == 600 and out["selection"] == "validation"
    Path(job["config"]).write_text("trainer:\n  max_steps: 450\n")  # the recipe changed: the record is stale
    with pytest.raises(RuntimeError, match="no/such/script.py"):
        semisup_demo._run_script(job, threads=1)


def test_run_all_reports_failures_and_keeps_the_others(job, capsys):
    _write_record(job, 60.0)
    broken = {**job, "record": "semisup/psmt_dino_s0", "out": job["out"] + "_psmt"}
    done, failed = semisup_demo.run_all([job, broken], parallel=1, threads=1)
    assert [d["last"]["mIoU"] for d in done] == [60.0]
    assert failed == [broken["out"]]
    assert "FAILED" in capsys.readouterr().out


def test_recorded_only_runs_nothing_and_keeps_the_recorded_runs(job, capsys):
    _write_record(job, 61.0)
    other = {**job, "record": "semisup/ael_dino_s0", "out": job["out"] + "_ael"}  # no record: would fail if run
    done, failed = semisup_demo.run_all([job, other], parallel=1, threads=1, recorded_only=True)
    assert [d["last"]["mIoU"] for d in done] == [61.0] and failed == []
    assert "1 of 2 runs recorded" in capsys.readouterr().out


def test_weights_digest_ignores_the_header_order_but_not_the_content(tmp_path):
    """safetensors writes metadata in a per-process random order, so the file SHA-256 of the same weights varies;
    the records key the weights by content."""
    import torch
    from safetensors.torch import save

    raw = save({"w": torch.arange(6.0).reshape(2, 3)}, metadata={"format": "x", "bands": "B02,B03"})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    reordered = json.dumps({"__metadata__": dict(reversed(list(header["__metadata__"].items()))),
                            **{k: v for k, v in header.items() if k != "__metadata__"}}).encode()
    reordered += b" " * (n - len(reordered)) if len(reordered) <= n else b""
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(raw)
    b.write_bytes(len(reordered).to_bytes(8, "little") + reordered + raw[8 + n:])
    c.write_bytes(save({"w": torch.arange(6.0).reshape(2, 3) + 1}, metadata={"format": "x", "bands": "B02,B03"}))
    assert a.read_bytes() != b.read_bytes()
    assert semisup_demo.weights_digest(a) == semisup_demo.weights_digest(b) != semisup_demo.weights_digest(c)


FAKE_RUN = '''
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--output-dir") + 1])
(out / "checkpoints").mkdir(parents=True, exist_ok=True)
(out / "checkpoints" / "best.safetensors").write_bytes(b"weights of " + out.name.encode())
with open(out.parent / "calls.txt", "a") as f:
    f.write(out.name + "\\n")
m = {"step": 8, "mIoU": 50.0 + len(open(out.parent / "calls.txt").read().split())}
(out / "metrics.json").write_text(json.dumps({"last": m, "best": m}))
'''


def test_a_run_started_from_another_table_run_is_keyed_by_its_record(job, tmp_path):
    """ProDA starts from the source-only run (model.init_from): its record names that run's record, so it is reused
    in a later session whose run folders are gone; when it must run and the source-only weights are gone, the
    source-only run is made again first (renewing its record, hence this run's key)."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    runs = tmp_path / "runs"
    base = {**job, "script": str(script), "overrides": job["overrides"][:-1]}
    source = {**base, "name": "source_only", "out": str(runs / "source_only"), "record": "uda/s2/source_only"}
    proda = {**base, "name": "proda", "out": str(runs / "proda"), "record": "uda/s2/proda", "init_job": source,
             "overrides": [*base["overrides"], f"model.init_from={runs / 'source_only'}"]}
    assert semisup_demo._run_script(source, threads=1)["last"]["mIoU"] == 51.0
    first = semisup_demo._record_key(proda)
    assert first["init_from_record_sha256"] is not None and "init_from_sha256" not in first
    assert semisup_demo._run_script(proda, threads=1)["last"]["mIoU"] == 52.0
    calls = runs / "calls.txt"
    assert calls.read_text().split() == ["source_only", "proda"]
    shutil.rmtree(runs / "source_only")
    shutil.rmtree(runs / "proda")  # a later session: only the records are left
    assert semisup_demo._run_script(proda, threads=1)["last"]["mIoU"] == 52.0  # reused, nothing run
    assert calls.read_text().split() == ["source_only", "proda"]
    semisup_demo._record_path(proda).unlink()  # ProDA must run: its source-only weights are made again first
    assert semisup_demo._run_script(proda, threads=1)["last"]["mIoU"] == 54.0
    assert calls.read_text().split() == ["source_only", "proda", "source_only", "proda"]
    assert semisup_demo._record_key(proda) != first  # the source-only record was renewed

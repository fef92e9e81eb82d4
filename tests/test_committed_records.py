"""The committed run records of the results tables (bench/results/records/) still describe the shipped configs.

A record is reused by its table script only while the config's digest (its parsed values, less other methods'
sections: ``bench/semisup_demo.py::config_digest``) equals the one it was made with. An edit of a shipped config that
changes a value -- even an explicit ``null`` equal to the default -- silently voids the records and the next run of
the table script re-makes every run; this test names the records such an edit would void."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from semisup_demo import config_digest  # noqa: E402

RECORDS = REPO / "bench" / "results" / "records"
TABLES = ("semisup", "uda", "pretrain_value")


def _records() -> list:
    out = []
    for table in TABLES:
        for path in sorted((RECORDS / table).rglob("*.json")):
            args = json.loads(path.read_text()).get("args", {})
            if "config_content_sha256" in args:
                out.append((path, args))
    return out


def test_there_are_records_to_check():
    assert len(_records()) >= 100


def test_every_record_matches_its_shipped_config():
    stale = []
    for path, args in _records():
        config = REPO / "configs" / "finetune" / args["config"]
        assert config.is_file(), f"{path.relative_to(REPO)}: config {args['config']} not in configs/finetune"
        methods = [o.split("=", 1)[1] for o in args["overrides"] if o.startswith("method=")]
        if config_digest(config.read_text(), methods[-1] if methods else None) != args["config_content_sha256"]:
            stale.append(str(path.relative_to(RECORDS)))
    assert not stale, (f"{len(stale)} record(s) no longer match their config (a config value changed; revert it or "
                       f"re-make the runs with the table script): {stale[:8]}")


def test_an_explicit_default_changes_the_digest():
    """Why the shipped configs show such keys as comments (demo_uda_s1.yaml's ``# stats_file: F``)."""
    base = "data:\n  root: x   # a comment\n"
    assert config_digest(base) == config_digest("data:\n  root: x\n# another comment\n")
    assert config_digest(base) != config_digest(base + "  stats_file: null\n")

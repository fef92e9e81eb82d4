"""bench/uda_demo.py: the runs of the adaptation table — warm starts from the source-only run of the same init and
seed, the multi-level methods' auxiliary head, and the per-domain standardisation rows (data.target.stats_file)."""

from __future__ import annotations

import argparse
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import uda_demo


def _args(**kw) -> argparse.Namespace:
    base = dict(data="/d", methods=list(uda_demo.METHODS), seeds=[1], runs="/runs", quick=False, export=[],
                scenarios=["s1"])
    return argparse.Namespace(**{**base, **kw})


def test_the_target_statistics_rows_are_their_method_with_the_scenarios_statistics():
    first, second = uda_demo._jobs(_args())
    jobs = {j["name"]: j for j in first + second}
    stats = "data.target.stats_file=/runs/s1/target_stats.json"
    assert "method=source_only" in jobs["source_only_tstats"]["overrides"] and stats in jobs["source_only_tstats"]["overrides"]
    assert jobs["source_only_tstats"] in first  # trained as source-only: nothing to wait for
    warm = jobs["selftrain_tstats"]
    assert "method=selftrain" in warm["overrides"] and stats in warm["overrides"]
    assert warm["init_job"]["record"] == jobs["source_only"]["record"] == "uda/s1/source_only_random_s1"
    assert "model.init_from=/runs/s1/source_only_random_s1" in warm["overrides"]
    assert warm["record"] == "uda/s1/selftrain_tstats_random_s1"
    for name in ("source_only", "selftrain", "adaptsegnet", "proda", "target_supervised"):
        assert not any(o.startswith("data.target.stats_file=") for o in jobs[name]["overrides"])
    assert "model.aux=true" in jobs["adaptsegnet"]["overrides"]


def test_a_warm_started_row_alone_brings_its_source_only_run():
    first, second = uda_demo._jobs(_args(methods=["selftrain_tstats"]))
    assert [j["name"] for j in first] == ["source_only", "target_supervised"]
    assert [j["name"] for j in second] == ["selftrain_tstats"]


def test_adaptsegnet_with_target_statistics_is_an_s1_row():
    first, second = uda_demo._jobs(_args(scenarios=["s2", "s1"]))
    rows = [(j["scenario"], j["name"]) for j in first + second]
    assert ("s1", "adaptsegnet_tstats") in rows and ("s2", "adaptsegnet_tstats") not in rows
    assert ("s2", "selftrain_tstats") in rows  # the other standardisation rows stay on both scenarios
    job = next(j for j in first if j["name"] == "adaptsegnet_tstats")
    assert job in first and "init_job" not in job  # from the same starting weights as source-only
    over = job["overrides"]
    assert {"method=adaptsegnet", "model.aux=true", "data.target.stats_file=/runs/s1/target_stats.json"} <= set(over)
    assert job["record"] == "uda/s1/adaptsegnet_tstats_random_s1"


def test_the_jitter_rows_are_their_own_recipe_with_their_own_baseline_and_bound():
    first, second = uda_demo._jobs(_args(scenarios=["s2", "s1"], methods=["selftrain_jitter"]))
    names = [(j["scenario"], j["name"]) for j in first + second]
    assert names == [("s1", "source_only_jitter"), ("s1", "target_supervised"), ("s1", "target_supervised_jitter"),
                     ("s1", "selftrain_jitter")]  # S1 only; a warm-started row alone brings its source-only run
    jobs = {j["name"]: j for j in first + second}
    jitter = "augment.brightness=0.3"
    assert uda_demo.JITTER == [jitter]
    base, warm, bound = jobs["source_only_jitter"], jobs["selftrain_jitter"], jobs["target_supervised_jitter"]
    assert "method=source_only" in base["overrides"] and jitter in base["overrides"]
    assert "method=selftrain" in warm["overrides"] and jitter in warm["overrides"]
    assert warm["init_job"]["record"] == base["record"] == "uda/s1/source_only_jitter_random_s1"
    assert "model.init_from=/runs/s1/source_only_jitter_random_s1" in warm["overrides"]
    assert jitter in bound["overrides"] and "data.root=/d/s1/target" in bound["overrides"]
    assert jitter not in jobs["target_supervised"]["overrides"]
    assert not any(o.startswith("data.target.stats_file=") for j in jobs.values() for o in j["overrides"])
    # the rows that existed before keep their runs: same overrides, same records
    first, second = uda_demo._jobs(_args(methods=["source_only", "selftrain"]))
    st = next(j for j in second if j["name"] == "selftrain")
    assert st["init_job"]["record"] == "uda/s1/source_only_random_s1" and not any("brightness" in o for o in
                                                                                    st["overrides"])

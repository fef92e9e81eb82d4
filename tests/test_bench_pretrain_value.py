"""bench/pretrain_value.py: the evaluation matrix it runs (tasks x label fractions x inits x seeds, the random rows
shared by every variant, variant overrides on the DINO fine-tuning runs only) and the pretraining curves it reports."""

from __future__ import annotations

import argparse
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import pretrain_value


def _args(**kw) -> argparse.Namespace:
    base = dict(data="/d", methods=list(pretrain_value.TASKS), seeds=[0, 1], runs="/runs", variant="default",
                finetune_override=[], eval_override=[], quick=False, fractions=list(pretrain_value.FRACTIONS))
    return argparse.Namespace(**{**base, **kw})


def _by_name(jobs: list[dict]) -> dict[tuple, dict]:
    return {(j["name"], j["fraction"], j["init"], j["seed"]): j for j in jobs}


def test_the_matrix_and_its_overrides(tmp_path):
    export = tmp_path / "backbone.safetensors"
    jobs = pretrain_value._jobs(_args(variant="lowlr", finetune_override=["model.backbone_lr_mult=0.1"]), export)
    assert len(jobs) == 2 * 3 * 2 * 2  # tasks x fractions x inits x seeds
    j = _by_name(jobs)
    assert [x["seed"] for x in jobs[:12]] == [0] * 12  # seed-major
    lp = j[("linear_probe", "1/32", "dino", 0)]["overrides"]
    assert "data.labelled_split=labelled_1_32" in lp and "data.batch_size=4" in lp
    assert "model.freeze_backbone=true" in lp and "model.version=v2" in lp and f"model.weights={export}" in lp
    assert "model.backbone_lr_mult=0.1" not in lp  # the variant's fine-tuning override: not in the probe
    ft = j[("finetune", "1/8", "dino", 1)]["overrides"]
    assert "model.backbone_lr_mult=0.1" in ft and "data.labelled_split=labelled_1_8" in ft
    assert "data.batch_size=4" not in ft and "model.freeze_backbone=true" not in ft
    rnd = j[("finetune", "all", "random", 1)]
    assert "model.backbone_lr_mult=0.1" not in rnd["overrides"]
    assert not any(o.startswith("model.weights=") for o in rnd["overrides"])
    assert "data.labelled_split=train_all" in rnd["overrides"]
    # records: the random rows are shared by every variant, the DINO rows are the variant's
    assert rnd["record"] == "pretrain_value/random/finetune_train_all_random_s1"
    assert j[("finetune", "1/8", "dino", 1)]["record"] == "pretrain_value/lowlr/finetune_labelled_1_8_dino_s1"
    other = _by_name(pretrain_value._jobs(_args(variant="nochannel"), export))
    assert other[("finetune", "all", "random", 1)]["record"] == rnd["record"]
    assert other[("finetune", "all", "random", 1)]["overrides"] == rnd["overrides"]


def test_an_evaluation_override_reaches_both_inits_and_gives_the_variant_its_own_random_rows(tmp_path):
    export = tmp_path / "backbone.safetensors"
    j = _by_name(pretrain_value._jobs(_args(variant="stem", eval_override=["model.stem_pool=false"]), export))
    for init in ("dino", "random"):
        for task in pretrain_value.TASKS:
            assert "model.stem_pool=false" in j[(task, "1/8", init, 0)]["overrides"]
    rnd = j[("finetune", "1/8", "random", 0)]
    assert rnd["record"] == "pretrain_value/random_stem/finetune_labelled_1_8_random_s0"  # not the shared rows
    assert rnd["out"] == "/runs/random_stem/finetune_labelled_1_8_random_s0"


def test_random_rows_only_without_an_export():
    jobs = pretrain_value._jobs(_args(seeds=[0]), None)
    assert len(jobs) == 2 * 3 and {j["init"] for j in jobs} == {"random"}


def test_a_screening_runs_the_chosen_fractions_only(tmp_path):
    jobs = pretrain_value._jobs(_args(seeds=[0], fractions=["1/8"]), tmp_path / "backbone.safetensors")
    assert len(jobs) == 2 * 2 and {j["fraction"] for j in jobs} == {"1/8"}


def test_pretraining_curves(tmp_path):
    rows = [{"step": 5, "train/log_k": 8.3, "train/loss": 8.2, "train/teacher_entropy": 2.9,
             "train/teacher_student_kl": 5.3},
            {"step": 10, "train/log_k": 8.3, "train/loss": 8.0, "train/teacher_entropy": 3.1,
             "train/teacher_student_kl": 4.0, "val/knn_top1": 52.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": 10, "train_time_s": 12.5}))
    s = pretrain_value.pretraining_summary(tmp_path, "configs/pretrain/demo_long.yaml", ["augment.channel_p=[0,0,0]"])
    assert s["curves"] == {"loss": [[5, 8.2], [10, 8.0]], "teacher_entropy": [[5, 2.9], [10, 3.1]],
                           "teacher_student_kl": [[5, 5.3], [10, 4.0]], "knn_top1": [[10, 52.0]]}
    assert (s["steps"], s["train_time_s"], s["log_k"]) == (10, 12.5, 8.3)
    assert s["overrides"] == ["augment.channel_p=[0,0,0]"]
    assert pretrain_value.pretraining_summary(None, None, [])["curves"] is None


def test_the_ablation_summary_pairs_seeds_and_skips_itself(tmp_path, capsys):
    def table(name, dino, rand, overrides, data=None):
        return {"finetune": {"dino": {"1/8": dino}, "random": {"1/8": rand}},
                "pretraining": {"run": f"runs/{name}", "data": data, "overrides": overrides, "steps": 1800,
                                "train_time_s": 600.0, "curves": {"knn_top1": [[300, 50.0], [1800, 56.25]]}},
                "variant": {"name": name, "finetune_overrides": []}}

    (tmp_path / "pretrain_value_a.json").write_text(json.dumps(
        table("a", {"0": 65.0, "1": 60.0}, {"0": 64.0, "1": 61.0, "2": 70.0}, ["augment.channel_p=[0,0,0]"])))
    (tmp_path / "pretrain_value_pool.json").write_text(json.dumps(
        table("pool", {"0": 63.0}, {"0": 64.0}, [], data="data/demo_pool")))
    (tmp_path / "pretrain_value_ablations.json").write_text("{}")  # the summary's own output: not a variant
    rows = pretrain_value.ablation_summary(tmp_path)
    assert set(rows) == {"a", "pool"}
    a = rows["a"]["tasks"]["finetune"]["1/8"]
    # seed 2 has no DINO run: left out of both means; gain = mean(65 - 64, 60 - 61) = 0
    assert a == {"dino": 62.5, "random": 62.5, "gain": 0.0, "seeds": ["0", "1"]}
    assert rows["a"]["pretraining_minutes"] == 10.0 and rows["a"]["knn_top1_last"] == 56.25
    assert rows["pool"]["tasks"]["finetune"]["1/8"]["gain"] == -1.0
    pretrain_value.print_ablations(rows)
    out = capsys.readouterr().out
    assert "| a (2 seeds) | augment.channel_p=[0,0,0] | 1800 | 10.0 | 56.2 | 62.50 (+0.00) |" in out
    assert "| pool | data data/demo_pool | 1800 |" in out

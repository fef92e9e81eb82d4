"""Bad input gets one clear message naming the key or file, exit status 2 and no traceback, before any work
(the README's table of bad inputs is these cases); ``--debug`` shows the traceback; under ``accelerate launch``
with two processes the message is printed once."""

from __future__ import annotations

import shutil

import pytest

from conftest import REPO, launch

PRETRAIN = str(REPO / "configs" / "pretrain" / "demo.yaml")
FINETUNE = str(REPO / "configs" / "finetune" / "demo.yaml")
TINY_PRETRAIN = ["model.arch=test_resnet", "data.batch_size=4", "trainer.epochs=null", "trainer.max_steps=2",
                 "trainer.progress_bar=false", "dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8"]
TINY_FINETUNE = ["model.arch=test_resnet", "trainer.max_steps=2", "trainer.progress_bar=false"]


def _fails(main, argv, capsys, *expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return lines[0]


def test_pretraining_inputs(tiny_demo, tmp_path, capsys):
    from eo_ssl.pretrain import main

    base = ["--config", PRETRAIN, "--output-dir", str(tmp_path / "run"), f"data.root={tiny_demo}", *TINY_PRETRAIN]
    _fails(main, base + ["data.sensor=S9"], capsys, "unknown sensor 'S9'", "data.sensor")
    _fails(main, base + ["data.bands=[B02,B99]"], capsys, "B99", "valid bands")
    _fails(main, base + ["dino.warmup_teacher_temp_epochs=50", "trainer.max_steps=null", "trainer.epochs=2"],
           capsys, "dino.warmup_teacher_temp_epochs=50", "exceeds the run's 2 epochs")
    _fails(main, base + [f"data.root={tmp_path / 'nowhere'}", "data.stats_file=null", "probe.root=null"], capsys,
           str(tmp_path / "nowhere"))
    _fails(main, base + ["model.arch=resnet_nope"], capsys, "resnet_nope", "model.arch")
    _fails(main, base + ["dino.out_dimm=5"], capsys, "unknown key 'dino.out_dimm'", "out_dim")
    assert not (tmp_path / "run").exists()  # nothing was written for any of them


def test_glob_override_is_a_string(tiny_demo, tmp_path):
    from common.config import load_config
    from eo_ssl.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, PRETRAIN, [f"data.root={tiny_demo}", "data.glob=*.tif"])
    assert cfg.data.glob == "*.tif"


def test_finetuning_inputs(tiny_demo, tmp_path, capsys):
    from finetune.semisup import main

    root = tmp_path / "source"
    shutil.copytree(tiny_demo / "s2" / "source", root)
    (root / "splits" / "empty.txt").write_text("\n# nothing\n")
    base = ["--config", FINETUNE, "--output-dir", str(tmp_path / "run"), f"data.root={root}",
            f"data.stats_file={tiny_demo / 's2' / 'stats.json'}", *TINY_FINETUNE]
    _fails(main, base + [f"model.weights={tmp_path / 'missing.safetensors'}"], capsys, "model.weights",
           "does not exist")
    _fails(main, base + ["data.labelled_split=empty"], capsys, "empty.txt", "holds no tile ids")
    _fails(main, base + ["data.batch_size=1"], capsys, "data.batch_size=1", "BatchNorm", "2 or more")
    _fails(main, base + ["method=fixmatchh"], capsys, "'method'", "supervised")
    _fails(main, base + ["data.batch_size=64"], capsys, "yields no batch", "data.batch_size")


def test_run_directory_rules(tiny_demo, tmp_path, capsys):
    from finetune.semisup import main

    run = tmp_path / "run"
    base = ["--config", FINETUNE, "--output-dir", str(run), f"data.root={tiny_demo / 's2' / 'source'}",
            f"data.stats_file={tiny_demo / 's2' / 'stats.json'}", "data.batch_size=2", *TINY_FINETUNE]
    _fails(main, base + ["--resume"], capsys, "--resume: no checkpoint")
    main(base)
    lines_before = (run / "metrics.jsonl").read_text()
    _fails(main, base, capsys, "already holds a run", "--resume", "--overwrite")
    assert (run / "metrics.jsonl").read_text() == lines_before  # nothing was retrained or appended
    main(base + ["--overwrite"])
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"train/loss"' in line]
    assert len(steps) == 1  # one log of the one new run (log_every 10 -> the final step only)


def test_debug_shows_the_traceback(tiny_demo, tmp_path, monkeypatch):
    from common.errors import UserInputError
    from eo_ssl.pretrain import main

    argv = ["--config", PRETRAIN, "--output-dir", str(tmp_path / "run"), f"data.root={tiny_demo}", "data.sensor=S9"]
    with pytest.raises(UserInputError, match="S9"):
        main(argv + ["--debug"])
    monkeypatch.setenv("EOSEG_DEBUG", "1")
    with pytest.raises(UserInputError, match="S9"):
        main(argv)


@pytest.mark.slow
def test_one_message_from_two_processes(tiny_demo, tmp_path):
    """Both ranks fail on the same input; only rank 0 prints it. (The launcher adds its own report of the failed
    processes after it, which a script cannot suppress; see the README.)"""
    res = launch("finetune/semisup.py", ["--config", FINETUNE, "--output-dir", str(tmp_path / "run"),
                                         f"data.root={tiny_demo / 's2' / 'source'}",
                                         f"model.weights={tmp_path / 'missing.safetensors'}"],
                 processes=2, check=False)
    assert res.returncode != 0
    assert res.stderr.count("error: model.weights") == 1, res.stderr[-3000:]
    assert "exitcode: 2" in res.stderr  # each process exited with status 2

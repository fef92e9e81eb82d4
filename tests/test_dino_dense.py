"""The dense term beside DINO's loss (dino.dense_weight; this project's, off by default): DenseCL's correspondence
by feature similarity, the per-location cross-entropy against hand-computed values, its own center, the wrapper's
pooled output unchanged by the dense pass, the mixed loss of DINOMethod and a pretraining run that uses it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.backbones import create_embedding_backbone
from conftest import REPO, launch
from eo_ssl.dino import (
    DINOConfig,
    DINOHead,
    DINOMethod,
    DenseDINOLoss,
    MultiCropWrapper,
    backbone_tokens,
    dense_cross_entropy,
    match_locations,
)


def test_each_location_matches_the_most_cosine_similar_location_of_the_other_view():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (B=1, L=3, D=2)
    b = torch.tensor([[[0.0, 2.0], [3.0, 0.1], [1.0, 1.2]]])
    # cosines of a[0] = (1, 0): 0, ~1.0, 0.64 -> 1; a[1] = (0, 1): 1, ~0.03, 0.77 -> 0; a[2]: 0.71, 0.73, 1.0 -> 2
    assert match_locations(a, b).tolist() == [[1, 0, 2]]
    assert match_locations(a * 5.0, b).tolist() == [[1, 0, 2]]  # cosine: the features' norms do not matter


def test_dense_cross_entropy_hand_computed():
    tau = 0.5
    # B = 1, L = 2, K = 2; the student's logits are tau * log(p) so its softmax gives p back
    p_s = [torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]), torch.tensor([[[0.8, 0.2], [0.1, 0.9]]])]
    s = [tau * torch.log(p) for p in p_s]
    q = [torch.tensor([[[0.6, 0.4], [0.3, 0.7]]]), torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])]
    matches = {(0, 1): torch.tensor([[1, 1]]), (1, 0): torch.tensor([[0, 1]])}

    def h(p, r):
        return -sum(pi * math.log(ri) for pi, ri in zip(p, r))

    # (0, 1): student view 0 locations 0 and 1 both take teacher view 1 location 1 = (0.5, 0.5)
    pair01 = (h([0.5, 0.5], [0.25, 0.75]) + h([0.5, 0.5], [0.5, 0.5])) / 2
    # (1, 0): location 0 <- teacher view 0 location 0 (0.6, 0.4); location 1 <- location 1 (0.3, 0.7)
    pair10 = (h([0.6, 0.4], [0.8, 0.2]) + h([0.3, 0.7], [0.1, 0.9])) / 2
    got = dense_cross_entropy(s, q, matches, tau)
    assert got.item() == pytest.approx((pair01 + pair10) / 2, rel=1e-6)


def test_dense_loss_center_is_the_mean_over_every_location_and_the_loss_uses_the_teachers_matches():
    torch.manual_seed(0)
    loss = DenseDINOLoss(out_dim=4, student_temp=0.1, center_momentum=0.9)
    t = torch.randn(4, 3, 4)  # (2 B, L, K_d) with B = 2, L = 3
    loss.update_center(t)
    torch.testing.assert_close(loss.center, 0.1 * t.reshape(-1, 4).mean(0, keepdim=True))
    # loss_and_stats equals dense_cross_entropy with the matches of the teacher's tokens and the current center
    s, tokens = torch.randn(4, 3, 4), torch.randn(4, 3, 5)
    got, stats = loss.loss_and_stats(s, t, tokens, teacher_temp=0.05)
    p = F.softmax((t - loss.center) / 0.05, dim=-1)
    tv = tokens.chunk(2)
    want = dense_cross_entropy(s.chunk(2), p.chunk(2), {(0, 1): match_locations(tv[0], tv[1]),
                                                        (1, 0): match_locations(tv[1], tv[0])}, 0.1)
    torch.testing.assert_close(got, want)
    assert 0 <= stats["dense_teacher_entropy"].item() <= math.log(4) + 1e-6


def test_the_dense_pass_leaves_the_pooled_output_as_it_was():
    torch.manual_seed(0)
    backbone = create_embedding_backbone("resnet10t", 3, output_stride=16)
    head, dense = DINOHead(backbone.embed_dim, 16, 32, 8), DINOHead(backbone.embed_dim, 8, 32, 8)
    wrapper = MultiCropWrapper(backbone, head, dense).eval()
    views = [torch.randn(2, 3, 48, 48)] * 2 + [torch.randn(2, 3, 24, 24)] * 2
    out, tokens, dense_out = wrapper(views, dense_views=2)
    torch.testing.assert_close(out, wrapper(views))
    assert tokens.shape == (4, 9, backbone.embed_dim) and dense_out.shape == (4, 9, 8)  # 48 px / 16 = 3 x 3
    pooled, toks = backbone_tokens(backbone, views[0])
    torch.testing.assert_close(pooled, backbone(views[0]))
    torch.testing.assert_close(toks.mean(1), pooled)  # the average pool of the map's locations
    with pytest.raises(ValueError, match="dense_head"):
        MultiCropWrapper(backbone, head)(views, dense_views=2)


def test_dinomethod_mixes_the_two_terms_and_trains_the_dense_head():
    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=16, hidden_dim=32, bottleneck_dim=8, use_bn_in_head=True, dense_weight=0.25,
                     dense_out_dim=8)
    cfg.validate()
    student, teacher = (create_embedding_backbone("resnet10t", 3, output_stride=16) for _ in range(2))
    method = DINOMethod(cfg, student, teacher, num_crops=4, epochs=2, total_steps=4)
    method.wrapped = lambda name: getattr(method, name)  # the engine's DDP lookup, on one process
    views = [torch.randn(2, 3, 48, 48)] * 2 + [torch.randn(2, 3, 24, 24)] * 2
    out = method.training_step({"tiles": views}, SimpleNamespace(epoch=1))
    torch.testing.assert_close(out["loss"], 0.75 * out["dino_loss"] + 0.25 * out["dense_loss"])
    out["loss"].backward()
    assert method.student.dense_head.mlp[0].weight.grad.abs().sum() > 0
    assert method.dense_loss.center.abs().sum() > 0  # updated after the loss
    assert "dense_loss.center" in method.state_dict() and "teacher.dense_head.mlp.0.weight" in method.state_dict()
    plain = DINOMethod(DINOConfig(out_dim=16, hidden_dim=32, bottleneck_dim=8), *(
        create_embedding_backbone("resnet10t", 3) for _ in range(2)), num_crops=4, epochs=2, total_steps=4)
    assert not any("dense" in k for k in plain.state_dict())  # dense_weight 0: DINO's modules only
    with pytest.raises(ValueError, match="dense_weight"):
        DINOConfig(dense_weight=1.0).validate()


def test_pretraining_with_the_dense_term_runs_and_exports_a_plain_backbone(tiny_demo, tmp_path):
    from test_pretrain import CONFIG, tiny_overrides

    run = tmp_path / "run"
    launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(run), *tiny_overrides(tiny_demo),
                               "dino.dense_weight=0.5", "dino.dense_out_dim=32", "model.output_stride=16"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/dense_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["train/loss"] == pytest.approx(0.5 * r["train/dino_loss"] + 0.5 * r["train/dense_loss"], rel=1e-5)
               for r in train)
    import timm
    from safetensors.torch import load_file

    net = timm.create_model("resnet10t", num_classes=0, in_chans=12)
    net.load_state_dict(load_file(str(run / "backbone.safetensors")), strict=True)  # no dense head in the export


@pytest.mark.slow
def test_the_dense_term_trains_in_two_processes_and_checkpoints_its_head_and_center(tiny_demo, tmp_path):
    """DDP with the dense head inside the wrapped student and the tuple output of the dense pass: two gloo processes
    run the dense steps (the dense center's all-reduce included) and the checkpoint holds the head and center."""
    from safetensors.torch import load_file
    from test_pretrain import CONFIG, tiny_overrides

    run = tmp_path / "ddp"
    launch("ssl/pretrain.py", ["--config", CONFIG, "--output-dir", str(run), *tiny_overrides(tiny_demo, steps=2),
                               "data.batch_size=2", "dino.dense_weight=0.5", "dino.dense_out_dim=32",
                               "model.output_stride=16"], processes=2)
    final = json.loads((run / "metrics.json").read_text())
    assert final["num_processes"] == 2 and "dense_loss" in final["train"]
    state = load_file(str(next((run / "checkpoints").glob("step_*/model.safetensors"))))
    assert state["dense_loss.center"].abs().sum() > 0
    assert any(k.startswith("student.dense_head.") for k in state)


def test_a_stride_the_backbone_cannot_take_is_refused_with_its_key(tiny_demo, tmp_path, capsys):
    from eo_ssl.pretrain import main
    from test_pretrain import CONFIG, tiny_overrides

    for bad in (["model.arch=vit_tiny_patch16_224", "model.output_stride=16"], ["model.output_stride=12"]):
        with pytest.raises(SystemExit) as exc:
            main(["--config", CONFIG, "--output-dir", str(tmp_path / "bad"), *tiny_overrides(tiny_demo), *bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "output_stride" in err and "Traceback" not in err

"""DINOv2 + iBOT + KoLeo: loss golden values and guards, Sinkhorn balance, the EMA teacher, last-layer
freeze, parameter groups, and gradients on a tiny ViT with real multi-crop views."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from medfound.config import OptimConfig
from medfound.pretrain.dino import DINOHead, DINOv2, DINOv2Settings
from medfound.pretrain.dino_losses import dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp

from helpers import TINY_VIT


def _dino(**kw) -> DINOv2:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True,
                            **{**TINY_VIT, "drop_path_rate": 0.1})
    return DINOv2(vit, DINOv2Settings(**{"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                                         "teacher_temp_warmup_steps": 10, "freeze_last_layer_steps": 2, **kw}))


def _crops(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"crops": [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] +
                     [torch.randn(b, 3, 16, 16, generator=g) for _ in range(3)]}


def test_sinkhorn_knopp_balances_prototypes():
    scores = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))  # not the global RNG: order-independent
    q = sinkhorn_knopp(scores, temperature=1.0, iterations=50)       # converged
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-4)       # each sample a distribution
    assert torch.allclose(q.sum(0), torch.full((8,), 4.0), atol=1e-2)  # each prototype equal mass (32 / 8)
    skewed = scores.clone()
    skewed[:, 0] += 5  # one prototype would win everything under a plain softmax
    assert F.softmax(skewed / 0.1, -1)[:, 0].mean() > 0.99
    assert sinkhorn_knopp(skewed, 0.1)[:, 0].mean() < 0.2          # DINOv2's 3 iterations already rebalance


def test_dino_loss_golden_value():
    t = [F.one_hot(torch.tensor([0, 1]), 3).float(), F.one_hot(torch.tensor([2, 2]), 3).float()]
    s = [torch.zeros(2, 3)] * 3  # uniform student: every pair costs log 3
    assert dino_loss(s, t, 0.1).item() == pytest.approx(math.log(3), rel=1e-6)
    same = [F.one_hot(torch.tensor([0, 1]), 3).float()] * 2      # both teacher views agree
    confident = [same[0] * 100] * 3                               # and so does every student view
    assert dino_loss(confident, same, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_ibot_loss_weights_images_equally():
    teacher = F.one_hot(torch.tensor([0, 0, 0, 1]), 2).float()
    student = torch.tensor([[10.0, 0], [10.0, 0], [10.0, 0], [0, 0]])  # image 0 right (3 patches), image 1 unsure
    loss = ibot_loss(student, teacher, torch.tensor([0, 0, 0, 1]), num_images=2, temperature=1.0)
    assert loss.item() == pytest.approx((F.cross_entropy(student[:1], torch.tensor([0])).item() + math.log(2)) / 2,
                                        rel=1e-5)
    assert ibot_loss(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 2, 1.0).item() == 0


def test_koleo_guards_and_golden_value():
    assert koleo_loss(torch.randn(1, 8)).item() == 0.0           # one sample: no neighbour, no NaN
    dup = torch.ones(4, 8)
    assert math.isfinite(koleo_loss(dup).item())                  # exact duplicates: floor distance, no -log(0)
    pair = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                 # unit vectors sqrt(2) apart
    assert koleo_loss(pair).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    spread, tight = torch.randn(16, 8), torch.randn(16, 8) * 0.01 + 1.0
    assert koleo_loss(spread).item() < koleo_loss(tight).item()  # rewards spreading out


def test_head_scores_are_cosines():
    head = DINOHead(32, out_dim=50, hidden_dim=16, bottleneck_dim=8)
    s = head(torch.randn(5, 32) * 100)
    assert s.shape == (5, 50) and s.abs().max() <= 1.0 + 1e-5


def test_forward_backward_reaches_the_student_only():
    dino = _dino()
    out = dino(_crops())
    assert torch.isfinite(out["loss"]) and 0 <= out["teacher_entropy"] <= 1
    assert out["masked_views"].item() == 4  # half of the 2 x 4 global views
    out["loss"].backward()
    assert dino.mask_token.grad is not None and dino.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in dino.teacher.parameters())
    trainable = [n for n, p in dino.named_parameters() if p.requires_grad]
    assert all(not n.startswith("teacher.") for n in trainable)
    missing = [n for n, p in dino.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing


def test_teacher_is_an_ema_of_the_student_and_stays_in_eval():
    dino = _dino()
    dino.train()
    assert not dino.teacher.training and dino.student.training
    for p in dino.student.parameters():
        p.data.add_(1.0)
    t0 = {n: p.clone() for n, p in dino.teacher.named_parameters()}
    s = dict(dino.student.named_parameters())
    m = dino.momentum(0, 100)
    assert m == pytest.approx(0.992)
    dino.after_optimizer_step(0, 100)
    for n, p in dino.teacher.named_parameters():
        assert torch.allclose(p, m * t0[n] + (1 - m) * s[n], atol=1e-6)
    assert dino.momentum(100, 100) == pytest.approx(1.0) and int(dino.step) == 1
    assert dino.teacher_temp(0) == pytest.approx(0.04) and dino.teacher_temp(10) == pytest.approx(0.07)


def test_last_layer_is_frozen_early():
    dino = _dino()
    dino(_crops())["loss"].backward()
    dino.before_optimizer_step(1, 100)
    assert dino.student["dino"].last_layer.weight.grad is None
    dino(_crops())["loss"].backward()
    dino.before_optimizer_step(2, 100)
    assert dino.student["dino"].last_layer.weight.grad is not None


def test_param_groups_layer_decay_and_patch_embed_multiplier():
    dino = _dino()
    groups = dino.param_groups(OptimConfig(lr=1e-3, layer_decay=0.5, patch_embed_lr_mult=0.2))
    by_param = {id(p): g for g in groups for p in g["params"]}
    bb = dino.student["backbone"]
    top, first = bb.blocks[-1].mlp.fc1.weight, bb.blocks[0].mlp.fc1.weight
    assert by_param[id(top)]["lr_scale"] == pytest.approx(2 * by_param[id(first)]["lr_scale"])  # decay 0.5 per block
    pe = by_param[id(bb.patch_embed.proj.weight)]["lr_scale"]
    assert pe == pytest.approx(0.2 * by_param[id(bb.cls_token)]["lr_scale"])
    assert by_param[id(dino.student["dino"].last_layer.weight)]["lr_scale"] == 1.0
    assert by_param[id(dino.mask_token)]["weight_decay"] == 0.0
    assert not any(id(p) in by_param for p in dino.teacher.parameters())
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in dino.parameters() if p.requires_grad)


def test_collapse_shows_in_the_monitors():
    dino = _dino(centering="centering")
    same = {"crops": [torch.ones(6, 3, 32, 32)] * 2 + [torch.ones(6, 3, 16, 16)] * 2}
    out = dino(same)
    assert out["teacher_feature_std"].item() < 1e-4  # identical images: every feature the same
    varied = dino(_crops(6))
    assert varied["teacher_feature_std"].item() > out["teacher_feature_std"].item()


def test_head_warmup_keeps_the_backbone_frozen_then_releases_it():
    """objective.head_warmup_steps: before the optimizer step the student's backbone loses its gradients while
    the heads keep theirs; after the warm-up the backbone trains again (and strategies are told gradients are
    edited)."""
    dino = _dino(head_warmup_steps=2, freeze_last_layer_steps=0)
    assert dino.touches_gradients
    for step, frozen in ((0, True), (1, True), (2, False)):
        dino.zero_grad(set_to_none=True)
        dino(_crops())["loss"].backward()
        dino.before_optimizer_step(step, 10)
        backbone = [p.grad for p in dino.student["backbone"].parameters()]
        assert all(g is None for g in backbone) == frozen, step
        assert dino.student["dino"].mlp[0].weight.grad is not None


def test_heads_travel_with_the_export_and_a_mismatch_names_the_settings(tmp_path):
    from safetensors.torch import save_file

    dino = _dino()
    files = dino.export_files()
    (tmp_path / "dino_heads.safetensors").write_bytes(files["dino_heads.safetensors"])
    other = _dino()
    torch.manual_seed(5)
    for p in other.student["dino"].parameters():
        p.data.normal_()
    other.load_heads(tmp_path / "dino_heads.safetensors")
    for tree in (other.student, other.teacher):
        assert all(torch.equal(a, b) for a, b in zip(tree["dino"].parameters(), dino.teacher["dino"].parameters()))
    save_file({"dino.last_layer.weight": torch.zeros(32, 16)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="objective.fresh_heads=true"):
        other.load_heads(tmp_path / "small.safetensors")


def test_gram_loss_is_the_mean_squared_difference_of_patch_cosine_similarities():
    from medfound.pretrain.dino_losses import gram_loss

    g = torch.Generator().manual_seed(3)
    s, a = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    expected = torch.stack([(F.cosine_similarity(s[b, i], s[b, j], dim=0) -
                             F.cosine_similarity(a[b, i], a[b, j], dim=0)) ** 2
                            for b in range(2) for i in range(5) for j in range(5)]).mean()
    assert gram_loss(s, a).item() == pytest.approx(expected.item(), rel=1e-5)
    assert gram_loss(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-6)  # cosines: the scale does not count
    s.requires_grad_(True)
    gram_loss(s, a).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_gram_anchoring_holds_the_patch_similarities_at_the_start():
    """objective.gram_weight: a frozen copy of the starting backbone anchors the student's patch-to-patch
    similarities. It stays the start (never trained, never moved by the EMA) unless gram_refresh_steps copies the
    teacher in; trained hard at a high learning rate, the anchored student keeps the start's similarity structure
    much better than the same run without the anchor."""
    from medfound.pretrain.dino_losses import gram_loss

    def drift(weight: float) -> tuple[float, DINOv2]:
        dino = _dino(gram_weight=weight, freeze_last_layer_steps=0)
        start = {k: v.clone() for k, v in dino.student["backbone"].state_dict().items()}
        opt = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=1e-2)
        for step in range(6):
            out = dino(_crops())
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            dino.after_optimizer_step(step, 100)
        x = _crops()["crops"][0]
        with torch.no_grad():
            _, now = dino.tokens(dino.student["backbone"], x)
            ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **TINY_VIT)
            ref.load_state_dict(start)
            _, then = dino.tokens(ref, x)
        return gram_loss(now, then).item(), dino

    free, _ = drift(0.0)
    held, anchored = drift(20.0)
    assert held < 0.25 * free, (held, free)  # measured: 0.009 against 0.130
    assert "gram_loss" in anchored(_crops())
    gram = dict(anchored.gram_teacher.named_parameters())
    assert not any(p.requires_grad for p in gram.values())
    teacher = dict(anchored.teacher["backbone"].named_parameters())
    assert any(not torch.equal(gram[n], teacher[n]) for n in gram)  # the EMA teacher moved, the anchor did not

    refreshed = _dino(gram_weight=1.0, gram_refresh_steps=2)
    for p in refreshed.student.parameters():
        p.data.add_(0.1)
    refreshed.after_optimizer_step(0, 100)
    gram = dict(refreshed.gram_teacher.named_parameters())
    assert any(not torch.equal(gram[n], t) for n, t in refreshed.teacher["backbone"].named_parameters())
    refreshed.after_optimizer_step(1, 100)  # the second step: the teacher is copied in
    assert all(torch.equal(gram[n], t) for n, t in refreshed.teacher["backbone"].named_parameters())

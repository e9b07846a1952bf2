"""Tuning strategies: exactly the right parameters train and receive gradients; LoRA merges exactly."""

from __future__ import annotations

import pytest
import timm
import torch

from medfound.adapt.heads import attach_classifier
from medfound.adapt.tasks import ClassificationTask
from medfound.adapt.tuning import apply_tuning, merged_copy, parameter_table
from medfound.config import LoraConfig
from medfound.data.manifest import LabelSchema

from helpers import TINY_VIT, assert_gradients_only_where_trainable, moved_by_step

SCHEMA = LabelSchema(type="ordinal", names=["0", "1", "2", "3", "4"])
D, MLP = TINY_VIT["embed_dim"], 4 * TINY_VIT["embed_dim"]


def _task(strategy: str, pool: str = "token", r: int = 4) -> ClassificationTask:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    head = attach_classifier(model, 5, pool=pool)
    model = apply_tuning(model, strategy, head, LoraConfig(r=r, alpha=2 * r), last_k=1)
    return ClassificationTask(model, head, SCHEMA)


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(4, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 2, 4])}


def test_lora_trains_exactly_adapters_and_head():
    task = _task("lora", r=4)
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    # per block: qkv (D -> 3D), proj (D -> D), fc1 (D -> 4D), fc2 (4D -> D); LoRA adds r * (in + out) each
    per_block = 4 * ((D + 3 * D) + (D + D) + (D + MLP) + (MLP + D))
    head = D * 5 + 5
    assert trainable == TINY_VIT["depth"] * per_block + head
    table = parameter_table(task.model, "head")
    assert table["lora"] == (TINY_VIT["depth"] * per_block,) * 2
    assert table["head"][0] == head and table["backbone"][0] == 0
    names = [n for n, p in task.named_parameters() if p.requires_grad]
    assert not any("patch_embed" in n for n in names)  # the patch-embedding conv is never adapted


@pytest.mark.parametrize("strategy", ["lora", "full", "linear_probe", "last_k"])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_gradients_reach_every_trainable_and_no_frozen_parameter(strategy, pool):
    task = _task(strategy, pool)
    if strategy == "lora":  # peft starts B at zero, so A would get no gradient: move off the init
        for n, p in task.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    out = task(_batch())
    assert out["logits"].shape == (4, 5)
    out["loss"].backward()
    assert_gradients_only_where_trainable(task, strategy)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    if strategy == "linear_probe":
        assert trainable == {"model.head.weight", "model.head.bias"}
    if strategy == "last_k":  # the last block, the final norm(s) and the classifier
        last = TINY_VIT["depth"] - 1
        assert trainable and all(n.startswith((f"model.blocks.{last}.", "model.norm.", "model.fc_norm.", "model.head."))
                                 for n in trainable)
        assert any(n.startswith(f"model.blocks.{last}.") for n in trainable)
    if strategy == "full":
        assert trainable == {n for n, _ in task.named_parameters()}


def test_lora_merged_equals_unmerged():
    task = _task("lora")
    for n, p in task.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    task.eval()
    x = _batch()["image"]
    with torch.no_grad():
        before_logits, before_feat = task.model(x), task.model.forward_features(x)
        merged = merged_copy(task.model)
        assert type(merged).__name__ == "VisionTransformer" and not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(x), before_logits, atol=1e-5)
        assert torch.allclose(merged.forward_features(x), before_feat, atol=1e-5)
        assert torch.equal(task.model(x), before_logits)  # merging a copy left the training model alone


def test_lora_target_that_matches_nothing_is_an_error():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    head = attach_classifier(model, 2)
    with pytest.raises(ValueError, match=r"matched no nn.Linear layer.*fc1.*qkv"):
        apply_tuning(model, "lora", head, LoraConfig(target_modules=["q_proj", "v_proj"]))


def test_classifier_on_a_cnn_backbone():
    model = timm.create_model("resnet18", num_classes=0)
    name = attach_classifier(model, 3, pool="avg")
    assert name == "fc"
    task = ClassificationTask(apply_tuning(model, "linear_probe", name), name, LabelSchema(type="multiclass",
                                                                                          names=["a", "b", "c"]))
    assert {n for n, p in task.named_parameters() if p.requires_grad} == {"model.fc.weight", "model.fc.bias"}
    assert task({"image": torch.randn(2, 3, 32, 32)})["logits"].shape == (2, 3)


def test_full_fine_tuning_gets_layer_wise_lr_decay():
    from medfound.config import OptimConfig

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    head = attach_classifier(model, 5)
    task = ClassificationTask(apply_tuning(model, "full", head), head, SCHEMA, full=True)
    groups = task.param_groups(OptimConfig(lr=1e-3, layer_decay=0.5))
    by_name = {}
    names = {id(p): n for n, p in task.model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[names[id(p)]] = g["lr_scale"]
    depth = TINY_VIT["depth"]  # timm: embeddings are layer 0, blocks 1..depth, the head depth + 1
    assert by_name["head.weight"] == 1.0
    assert by_name["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** depth)
    assert by_name["patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1))
    assert len(by_name) == sum(1 for _ in task.parameters())


@pytest.mark.parametrize("strategy", ["lora", "full", "last_k"])
def test_head_warmup_trains_the_classifier_alone_then_the_tuning(strategy):
    """head_warmup_steps (LP-FT): for the first steps only the classifier moves (weight decay included: the held
    parameters are skipped, not decayed); after them the tuning's parameters train too."""
    task = _task(strategy)
    for n, p in task.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: move off the init so A gets a gradient
            torch.nn.init.normal_(p, std=0.02)
    task.head_warmup_steps = 2
    assert task.touches_gradients
    moved = moved_by_step(task, _batch(), 4)
    head = {n for n, p in task.named_parameters() if p.requires_grad and ".head." in f".{n}"}
    assert head and moved[0] == head and moved[1] == head
    assert moved[2] > head  # the backbone's trainable parameters move from the first step after the warm-up
    assert all(n in moved[3] for n, p in task.named_parameters() if p.requires_grad)


def test_without_head_warmup_every_trainable_parameter_moves_from_the_first_step():
    task = _task("full")
    assert not task.touches_gradients
    moved = moved_by_step(task, _batch(), 1)
    assert moved[0] == {n for n, p in task.named_parameters() if p.requires_grad}

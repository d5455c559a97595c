"""VPT against a reference written here: the prompt init bound on RGB and grey backbones, where the prompts sit
(after CLS/registers, before the patches, after the position embedding; shallow into block 0, deep a fresh set per
block; stripped after the final norm), and prompt dropout only in training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.models.vision_transformer import Block

from backbones import create_backbone
from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import block_inputs, embed


def prompt_bound(in_chans: int, patch: int, dim: int) -> float:
    """The VPT code's Xavier-uniform bound for the patch projection: sqrt(6 / (fan_in + fan_out))."""
    return math.sqrt(6.0 / (in_chans * patch * patch + dim))


@pytest.mark.parametrize(("backbone", "in_chans", "patch", "dim"), [
    (lambda: make_tiny_vit(patch_size=4), 3, 4, 32),
    (lambda: make_tiny_vit(patch_size=16), 3, 16, 32),
    (lambda: create_backbone("vit_embedded_p7_28"), 1, 7, 128),  # the grey embedded default: sqrt(6 / 177)
])
def test_prompt_init_is_uniform_within_the_xavier_bound(backbone, in_chans, patch, dim):
    torch.manual_seed(0)
    model = create_method("vpt_deep", backbone(), num_classes=3, prompt_length=100)
    bound = prompt_bound(in_chans, patch, dim)
    values = model.vpt_prompts.detach().flatten()
    assert values.numel() >= 6_400  # max of n uniform draws misses the bound by ~bound / n
    assert values.abs().max() <= bound
    assert values.max() > 0.99 * bound and values.min() < -0.99 * bound
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # uniform(-v, v): std v / sqrt(3)
    if in_chans == 1:  # the VPT code's hard-coded 3 channels would give a bound the samples exceed
        assert prompt_bound(3, patch, dim) < 0.99 * bound
    assert prompt_bound(1, 7, 128) == pytest.approx(math.sqrt(6 / 177))


def reference_vpt(model, images: torch.Tensor, deep: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """VPT as the paper writes it (eq. 1-5), with plain timm blocks: (features after stripping, logits, every
    block's input sequence)."""
    backbone, prompts = model.backbone, model.vpt_prompts  # (L, p, D)
    prefix, p, batch = backbone.num_prefix_tokens, prompts.shape[1], len(images)
    x, inputs = embed(backbone, images), []
    for layer, block in enumerate(backbone.blocks):
        if layer == 0:
            x = torch.cat([x[:, :prefix], prompts[0].expand(batch, -1, -1), x[:, prefix:]], dim=1)
        elif deep:  # the previous block's prompt outputs are replaced by this layer's prompts
            x = torch.cat([x[:, :prefix], prompts[layer].expand(batch, -1, -1), x[:, prefix + p:]], dim=1)
        inputs.append(x)
        x = Block.forward(block, x)
    x = backbone.norm(x)
    features = torch.cat([x[:, :prefix], x[:, prefix + p:]], dim=1)
    pooled = features[:, prefix:].mean(dim=1) if backbone.global_pool == "avg" else features[:, 0]
    return features, backbone.head(backbone.fc_norm(pooled)), inputs


VITS = {
    "cls": {},
    "registers, pos on patches only": {"reg_tokens": 2, "no_embed_class": True, "class_token": True},
    "mean-pooled": {"global_pool": "avg", "fc_norm": True},
}


@pytest.mark.parametrize("fused_attn", [True, False], ids=["fused attention", "explicit attention"])
@pytest.mark.parametrize("vit", VITS.values(), ids=VITS.keys())
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_vpt_equals_the_reference_forward(deep, vit, fused_attn):
    torch.manual_seed(0)
    backbone = make_tiny_vit(**vit)
    if not fused_attn:  # VPT-deep then keeps timm's Block and inserts prompt rows (fused: key/value-only blocks)
        for module in backbone.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    model = create_method("vpt_deep" if deep else "vpt_shallow", backbone, num_classes=3, prompt_length=5,
                          prompt_dropout=0.0).eval()
    with torch.no_grad():
        model.vpt_prompts.normal_()  # prompts that move the outputs well beyond the tolerance
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_features, expected_logits, expected_inputs = reference_vpt(model, images, deep)
        features, logits, inputs = model.forward_features(images), model(images), block_inputs(model, images)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    for layer, (seen, expected) in enumerate(zip(inputs, expected_inputs, strict=True)):  # attention cannot tell
        torch.testing.assert_close(seen, expected, rtol=0, atol=1e-5, msg=f"block {layer} input")  # token order
    if deep:  # the comparison tells deep from shallow (block 0's prompts only)
        assert not torch.allclose(reference_vpt(model, images, False)[1], expected_logits, atol=1e-3)


def prompts_entering_block0(model, images) -> torch.Tensor:
    """The prompt rows block 0 sees, wherever the method passes them (in the sequence, or beside it)."""
    seen = {}
    prefix, p = model.backbone.num_prefix_tokens, model.prompt_length

    def capture(_module, args, kwargs):
        prompts = kwargs.get("prompts")
        seen["prompts"] = (args[0][:, prefix:prefix + p] if prompts is None else prompts).detach().clone()

    handle = model.backbone.blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    model(images)
    handle.remove()
    return seen["prompts"]


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_prompt_dropout_only_in_training(deep, tiny_batch):
    method = "vpt_deep" if deep else "vpt_shallow"
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3, prompt_length=8, prompt_dropout=0.5)
    no_dropout = copy.deepcopy(model)
    no_dropout.prompt_dropout.p = 0.0
    images = tiny_batch[0]

    model.train()
    entering = prompts_entering_block0(model, images).expand(len(images), -1, -1)
    kept = entering != 0  # inverted dropout: each entry is 0 or prompt / (1 - rate)
    torch.testing.assert_close(entering[kept], (2 * model.vpt_prompts[0]).expand_as(entering)[kept])
    assert 0.3 < kept.float().mean() < 0.7
    torch.manual_seed(1)
    first = model(images)
    torch.manual_seed(1)
    assert torch.equal(model(images), first)  # the masks come from torch's RNG ...
    torch.manual_seed(2)
    assert not torch.allclose(model(images), first)  # ... and change with it
    assert not torch.allclose(first, no_dropout.train()(images))

    model.eval()
    entering = prompts_entering_block0(model, images)
    assert torch.equal(entering[0], model.vpt_prompts[0].detach())  # untouched in evaluation
    torch.manual_seed(3)
    evaluated = model(images)
    torch.manual_seed(4)
    assert torch.equal(model(images), evaluated)
    torch.testing.assert_close(evaluated, no_dropout.eval()(images), rtol=0, atol=1e-6)


def test_prompt_dropout_defaults_and_the_paper_length():
    deep = create_method("vpt_deep", make_tiny_vit(), num_classes=3)
    shallow = create_method("vpt_shallow", make_tiny_vit(), num_classes=3)
    assert deep.prompt_dropout.p == 0.1 and shallow.prompt_dropout.p == 0.0
    assert deep.vpt_prompts.shape == (2, 50, 32) and shallow.vpt_prompts.shape == (1, 50, 32)
    assert create_method("vpt_shallow", make_tiny_vit(), num_classes=3, prompt_dropout=0.3).prompt_dropout.p == 0.3

"""VPT-deep's prompt_layers (the paper's prompt-depth ablation; the official code's NUM_DEEP_LAYERS / REVERSE_DEEP):
which blocks take a fresh prompt set, checked against a reference forward written here, and the tuned-parameter count
by formula."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from methods import create_method
from methods.vpt import parse_layers
from tests.helpers.models import make_tiny, make_tiny_vit
from tests.helpers.vit import block_inputs, embed

DEPTH, WIDTH, P, CLASSES = 4, 32, 3, 5


def reference(model, images: torch.Tensor, layers: set[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blocks counted from 1: block b in `layers` takes the next row of vpt_prompts, inserted after the prefix where
    the sequence holds no prompts yet, else replacing the previous block's prompt outputs; other blocks run on what
    they get. (logits, every block's input)."""
    backbone, prompts = model.backbone, model.vpt_prompts
    prefix, batch = backbone.num_prefix_tokens, len(images)
    x, inputs, row, holds = embed(backbone, images), [], 0, False
    for number, block in enumerate(backbone.blocks, start=1):
        if number in layers:
            rest = x[:, prefix + P:] if holds else x[:, prefix:]
            x = torch.cat([x[:, :prefix], prompts[row].expand(batch, -1, -1), rest], dim=1)
            row, holds = row + 1, True
        inputs.append(x)
        x = Block.forward(block, x)
    x = backbone.norm(x)
    if holds:
        x = torch.cat([x[:, :prefix], x[:, prefix + P:]], dim=1)
    return backbone.head(backbone.fc_norm(x[:, 0])), inputs


@pytest.mark.parametrize(("spec", "layers"), [
    ("1", {1}),  # shallow's placement, with VPT-deep's dropout default
    ("2", {2}),  # no prompt before block 2
    ("1-2", {1, 2}),  # the official NUM_DEEP_LAYERS=2: prompts carried through blocks 3 and 4
    ("3-4", {3, 4}),  # the official REVERSE_DEEP with NUM_DEEP_LAYERS=2
    ("1+3", {1, 3}),
    ("1-4", {1, 2, 3, 4}),  # deep
    (2, {2}), ([1, 4], {1, 4}),  # an int or a list, as a recipe's YAML gives them
])
@pytest.mark.parametrize("fused_attn", [True, False], ids=["key/value blocks", "inserted rows"])
def test_prompts_enter_the_blocks_named_and_nowhere_else(spec, layers, fused_attn):
    torch.manual_seed(0)
    backbone = make_tiny_vit(depth=DEPTH)
    if not fused_attn:
        for module in backbone.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    model = create_method("vpt_deep", backbone, num_classes=CLASSES, prompt_length=P, prompt_dropout=0.0,
                          prompt_layers=spec).eval()
    assert model.vpt_prompts.shape == (len(layers), P, WIDTH)
    with torch.no_grad():
        model.vpt_prompts.normal_()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_inputs = reference(model, images, layers)
        logits, inputs = model(images), block_inputs(model, images)
        shallow_like, _ = reference(model, images, {1})
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for number, (seen, want) in enumerate(zip(inputs, expected_inputs, strict=True), start=1):
        torch.testing.assert_close(seen, want, rtol=0, atol=1e-5, msg=f"block {number} input")
    if layers != {1}:  # the placement decides the output
        assert not torch.allclose(logits, shallow_like, atol=1e-3)


@pytest.mark.parametrize("spec", ["1", "2-4", "1+3", "1-4"])
def test_tuned_parameters_are_blocks_times_p_times_width_plus_the_head(spec):
    model = create_method("vpt_deep", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_length=P,
                          prompt_layers=spec)
    blocks = {"1": 1, "2-4": 3, "1+3": 2, "1-4": 4}[spec]
    assert model.tuned_params == blocks * P * WIDTH + WIDTH * CLASSES + CLASSES


def test_all_blocks_is_vpt_deep_and_block_one_is_vpt_shallows_placement():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    deep = create_method("vpt_deep", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_length=P).eval()
    torch.manual_seed(0)
    named = create_method("vpt_deep", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_length=P,
                          prompt_layers="1-4").eval()
    torch.manual_seed(0)
    shallow = create_method("vpt_shallow", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_length=P).eval()
    torch.manual_seed(0)
    first = create_method("vpt_deep", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_length=P,
                          prompt_layers="1").eval()
    with torch.no_grad():
        torch.testing.assert_close(named(images), deep(images), rtol=0, atol=0)
        torch.testing.assert_close(first(images), shallow(images), rtol=0, atol=1e-6)


def test_parse_layers_by_hand():
    assert parse_layers("1-6") == (1, 2, 3, 4, 5, 6)
    assert parse_layers("1+3+7-9") == (1, 3, 7, 8, 9)
    assert parse_layers("3-4+1") == (1, 3, 4) and parse_layers(4) == (4,) and parse_layers([2, 1]) == (1, 2)
    for bad in ("0", "3-1", "1,2", "a", "1-", "-2", ""):
        with pytest.raises(ValueError, match="prompt_layers"):
            parse_layers(bad)


def test_layers_beyond_the_depth_shallow_and_other_families_are_refused():
    with pytest.raises(ValueError, match="names block 5, but the backbone has 4 blocks"):
        create_method("vpt_deep", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_layers="1-5")
    with pytest.raises(ValueError, match="prompt_layers is VPT-deep's depth study on a ViT"):
        create_method("vpt_shallow", make_tiny_vit(depth=DEPTH), num_classes=CLASSES, prompt_layers="1")
    with pytest.raises(ValueError, match="prompt_layers is VPT-deep's depth study on a ViT"):
        create_method("vpt_deep", make_tiny("swin"), num_classes=CLASSES, prompt_layers="1")
    with pytest.raises(ValueError, match="a ConvNet's pixel prompt has no blocks"):
        create_method("vpt_shallow", make_tiny("convnet"), num_classes=CLASSES, prompt_layers="1")

"""DTL against the official forward written out here (models/vision_transformer.py of heekhero/DTL): the side sum
r += B_i A_i x_i before block i, x = block(x) + swish_beta(r) after the add blocks, then the mean of the patch
tokens, the final norm, the head; rank 2, beta 100, every block read, the last half added back."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from tests.helpers.models import make_tiny_vit
from tests.helpers.vit import DEPTH, HEAD, D, embed, vit_b_tuned


def test_vit_b_count_follows_the_formula():
    side = DEPTH * 2 * 2 * D  # A (2 x D) and B (D x 2) per block, no biases
    assert vit_b_tuned("dtl") == side + HEAD == 190_664
    assert vit_b_tuned("dtl", fusion_size=3) == side + D * 3 * 3 + HEAD  # DTL+: one depth-wise 3x3, no bias
    assert vit_b_tuned("dtl", read_blocks="3-12", rank=4) == 10 * 2 * 4 * D + HEAD


def reference_logits(model, images, read: set[int], add: set[int], fusion=None):
    backbone, beta = model.backbone, model.options.beta
    x, side = embed(backbone, images), 0.0
    for i, block in enumerate(backbone.blocks):
        if i in read:
            s = model.dtl_side[str(i)]
            side = side + x @ s.down.weight.T @ s.up.weight.T
        x = block(x)
        if i in add:
            act = side * torch.sigmoid(beta * side)
            if fusion is not None:  # the code's lora_fusion over the 4 x 4 patch grid, CLS passed on
                grid = act[:, 1:].reshape(len(x), 4, 4, -1).permute(0, 3, 1, 2)
                grid = F.conv2d(grid, fusion.weight, padding=1, groups=grid.shape[1])
                act = torch.cat([act[:, :1], grid.permute(0, 2, 3, 1).reshape(len(x), 16, -1)], dim=1)
            x = x + act
    return backbone.head(backbone.norm(x[:, 1:].mean(dim=1)))


@pytest.mark.parametrize(("options", "read", "add"), [
    ({}, {0, 1}, {1}), ({"read_blocks": "2", "add_blocks": "2"}, {1}, {1}),
    ({"fusion_size": 3, "add_blocks": "1-2"}, {0, 1}, {0, 1}),  # added after block 1: the CLS row reaches the head
])
def test_side_network_sums_block_inputs_and_adds_back_after_the_chosen_blocks(options, read, add):
    torch.manual_seed(0)
    model = create_method("dtl", make_tiny_vit(), num_classes=3, beta=2.0, **options).eval()
    assert set(model.dtl_side) == {str(i) for i in read} and model.add_after == add
    with torch.no_grad():
        for side in model.dtl_side.values():
            side.up.weight.normal_(std=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_logits(model, images, read, add, model.dtl_fusion)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)


def test_init_leaves_every_token_as_the_backbones(tiny_batch):
    torch.manual_seed(0)
    plain = make_tiny_vit().eval()
    model = create_method("dtl", copy.deepcopy(plain), num_classes=3).eval()
    assert all(s.up.weight.abs().sum() == 0 and s.down.weight.abs().sum() > 0 for s in model.dtl_side.values())
    assert model.rank == 2 and model.pool == "patch_mean" and model.options.beta == 100.0  # None: the ViT code's
    with torch.no_grad():
        assert torch.equal(model.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]))
    backbone_pool = create_method("dtl", copy.deepcopy(plain), num_classes=3, pool="backbone").eval()
    plain.reset_classifier(3)
    plain.head = copy.deepcopy(backbone_pool.backbone.head)
    with torch.no_grad():
        torch.testing.assert_close(backbone_pool(tiny_batch[0]), plain(tiny_batch[0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"read_blocks": "2", "add_blocks": "1"}, "add_blocks must start at or after read_blocks' first"),
    ({"add_blocks": "1-3"}, "dtl block 3 in '1-3' is beyond the backbone's 2 blocks"),
    ({"fusion_size": 2}, "dtl fusion_size must be odd"),
    ({"read_blocks": "x"}, r"dtl read_blocks must be block numbers counted from 1: a range \(7-12\)"),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("dtl", make_tiny_vit(), num_classes=3, **options)

"""vqt: Visual Query Tuning as its official code (github.com/andytu28/VQT, src/models/vit_backbones/h2t_vit.py)
computes it: count, the backbone's features unchanged bit for bit, a hand-written joint-sequence forward of the
official code, what trains, register tokens and bad options."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.params import count_params
from methods import create_method, get_method_class
from tests.helpers.data import DeterministicData
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import train_steps

D, C, DEPTH = 768, 200, 12  # ViT-B/16 width and depth; CUB-200's classes


def vqt_count(q: int, dim: int = D, depth: int = DEPTH, classes: int = C) -> int:
    """q query tokens per layer + the head over concat(CLS, L·q query outputs): the official code's feat_dim
    768 + 768·12·num_q (build_h2t_model.py, combine_method 'concat')."""
    return depth * q * dim + (dim + dim * depth * q) * classes + classes


def test_vit_b_count_follows_the_official_feature_width():
    assert vqt_count(1) == 12 * 768 + (768 * 13) * 200 + 200 == 2_006_216  # q = 1, the official README's
    table = count_params("vit_base_patch16_224", C, methods=["vqt"], given=[("num_queries", 5)])
    assert table.set_index("method").loc["vqt", "tuned_params"] == vqt_count(5)  # the config's default 5
    assert count_params("vit_base_patch16_224", C, methods=["vqt"]).loc[0, "tuned_params"] == vqt_count(1)


def test_class_facts_and_defaults():
    cls = get_method_class("vqt")
    assert (cls.label, cls.color, cls.paper_row, cls.identity_at_init) == ("VQT", "#393b79", None, False)
    model = create_method("vqt", make_tiny_vit(), num_classes=3)
    assert model.vqt_queries.shape == (2, 1, 32) and model.query_dropout.p == 0.1
    torch.manual_seed(0)
    many = create_method("vqt", make_tiny_vit(), num_classes=3, num_queries=50).vqt_queries  # 3,200 draws
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))  # the official (VPT) init bound: in_chans · patch² + D
    assert 0.99 * bound < many.abs().max() <= bound and abs(many.mean()) < 0.05 * bound
    assert model.backbone.head.in_features == 32 * (1 + 2 * 1)


@pytest.mark.parametrize("vit", [{}, {"reg_tokens": 2}, {"qk_norm": True, "init_values": 0.1}])
def test_backbone_features_are_the_plain_backbones_exactly(vit, tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit(**vit)
    plain = copy.deepcopy(backbone).eval()
    model = create_method("vqt", backbone, num_classes=3, num_queries=3).eval()
    with torch.no_grad():
        model.vqt_queries.normal_()  # large queries: any leak into the tokens would show
        assert torch.equal(model.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]))


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, H, rows, d)


def official_joint_forward(model, images: torch.Tensor) -> torch.Tensor:
    """h2t_vit.py's Head2ToeEncoder / Head2ToeAttention written out on timm's weights: per block, the layer's
    queries are prepended, attention takes queries from every row and keys/values from the original rows only
    (`hidden_states[:, query_prompt_len:]`), the block's residual and MLP run over every row, and the query rows
    are split off; then concat of the normalised final CLS and each layer's flattened query outputs."""
    vit = model.backbone
    q = model.vqt_queries.shape[1]
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    outputs = []
    for layer, block in enumerate(vit.blocks):
        seq = torch.cat([model.vqt_queries[layer].expand(len(images), -1, -1), x], dim=1)
        attn, heads = block.attn, block.attn.num_heads
        h = block.norm1(seq)
        qkv = h @ attn.qkv.weight.T + attn.qkv.bias
        queries, keys, values = qkv.split(attn.attn_dim, dim=-1)
        keys, values = keys[:, q:], values[:, q:]  # the original tokens only
        scores = split_heads(queries, heads) @ split_heads(keys, heads).transpose(-1, -2) / math.sqrt(attn.head_dim)
        context = (scores.softmax(-1) @ split_heads(values, heads)).transpose(1, 2).reshape(seq.shape)
        seq = seq + block.ls1(context @ attn.proj.weight.T + attn.proj.bias)
        seq = seq + block.ls2(block.mlp(block.norm2(seq)))
        outputs.append(seq[:, :q])
        x = seq[:, q:]
    cls = vit.norm(x)[:, 0]
    return torch.cat([F.normalize(cls, dim=1)] + [F.normalize(o.flatten(1), dim=1) for o in outputs], dim=1)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_head_reads_the_official_codes_concatenation(num_queries, tiny_batch):
    torch.manual_seed(0)
    model = create_method("vqt", make_tiny_vit(init_values=0.5), num_classes=3, num_queries=num_queries).eval()
    with torch.no_grad():
        expected = official_joint_forward(model, tiny_batch[0])
        torch.testing.assert_close(model.head_features(tiny_batch[0]), expected, rtol=1e-5, atol=1e-6)
        logits = expected @ model.backbone.head.weight.T + model.backbone.head.bias
        torch.testing.assert_close(model(tiny_batch[0]), logits, rtol=1e-5, atol=1e-6)


def test_normalize_off_concatenates_the_raw_parts(tiny_batch):
    torch.manual_seed(0)
    model = create_method("vqt", make_tiny_vit(), num_classes=3, normalize=False).eval()
    with torch.no_grad():
        features = model.head_features(tiny_batch[0])
        cls = model.backbone.forward_features(tiny_batch[0])[:, 0]
    torch.testing.assert_close(features[:, :32], cls, rtol=0, atol=1e-6)
    assert not torch.allclose(features[:, 32:64].norm(dim=1), torch.ones(4))


def test_training_moves_exactly_the_queries_and_head(tiny_batch):
    torch.manual_seed(0)
    model = create_method("vqt", make_tiny_vit(), num_classes=3)
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert tuned == {"vqt_queries", "backbone.head.weight", "backbone.head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model.model_step(tiny_batch)[0].backward()
    assert (model.vqt_queries.grad.abs().sum(dim=(1, 2)) > 0).all()  # every layer's queries get gradient
    model.zero_grad()
    train_steps(model, tiny_batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == tuned


def test_query_dropout_masks_per_image_in_training_only(tiny_batch):
    torch.manual_seed(0)
    model = create_method("vqt", make_tiny_vit(), num_classes=3, query_dropout=0.5)
    assert model.train().query_dropout.training and not model.backbone.blocks[0].training
    images = tiny_batch[0][:1].expand(4, -1, -1, -1)  # the same image 4 times
    with torch.no_grad():
        train_features = model.head_features(images)
        eval_features = model.eval().head_features(images)
    assert not torch.allclose(train_features[0], train_features[1])  # each image its own mask
    torch.testing.assert_close(eval_features[0], eval_features[1])


@pytest.mark.parametrize(("options", "message"), [
    ({"num_queries": 0}, r"num_queries must be an integer in \[1, 1000\].*got 0"),
    ({"num_queries": 1.5}, "num_queries must be an integer"),
    ({"num_queries": True}, "num_queries must be an integer"),
    ({"query_dropout": 1.0}, r"query_dropout must be a number in \[0, 1\), got 1.0"),
    ({"query_dropout": "0.1"}, r"query_dropout must be a number in \[0, 1\)"),
    ({"normalize": "yes"}, "normalize must be true or false, got 'yes'"),
    ({"prompt_length": 3}, "has no option"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("vqt", make_tiny_vit(), num_classes=3, **options)


def test_other_block_types_are_refused():
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(ValueError, match="plain Block/Attention"):
        create_method("vqt", make_tiny_vit(block_fn=ParallelScalingBlock), num_classes=3)


def test_never_served_from_cached_backbone_features():
    from benchmark.core.features import can_cache

    assert not can_cache(create_method("vqt", make_tiny_vit(), num_classes=3), DeterministicData())

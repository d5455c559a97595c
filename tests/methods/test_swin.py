"""VPT and the other methods on a timm Swin, against references written here.

The VPT reference follows the official code (KMnP/vpt src/models/vit_prompt/swin_transformer.py and BasicLayer's
deep loop in src/models/vit_backbones/swin_transformer.py) one image and one window at a time: its own window
partition, cyclic shift, padding, relative-position index and shift mask from the coordinates, the prompts
prepended to every window with zero bias and mask entries, their outputs averaged over the image's windows, the
4x channel concatenation at patch merging, and the final norm and average over prompts and tokens.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from backbones import create_backbone
from methods import create_method
from tests.helpers.models import make_tiny
from tests.helpers.swin import DEPTHS, HEAD, WIDTHS, block_params, layer_norm, linear, region, swin_b_total

# Tiny Swins: tests/helpers/models.py's (8x8 then 4x4 tokens, 4x4 windows: shifted windows in stage 0 only), three
# stages with shifted windows in two of them, and 3x3 windows on 8x8 / 4x4 maps (timm pads; shifted too).
SWINS = {
    "tiny": {},
    "three stages, two shifted": dict(img_size=64, depths=(2, 2, 2), num_heads=(1, 2, 4)),
    "padded windows": dict(window_size=3),
}


def window_attention(attn, seq, coords, window, shift, padded):
    """Attention over one window's [prompts, tokens] (p + area, C): head by head, the relative-position bias
    from the coordinates (zero for prompt rows/columns), -100 between different shift regions."""
    p = seq.shape[0] - len(coords)
    heads, (win_h, win_w) = attn.num_heads, window
    qkv = linear(attn.qkv, seq).reshape(len(seq), 3, heads, -1)
    bias = torch.zeros(heads, len(seq), len(seq))
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            index = (ri - rj + win_h - 1) * (2 * win_w - 1) + (ci - cj + win_w - 1)
            bias[:, p + i, p + j] = attn.relative_position_bias_table[index]
            if any(shift):
                regions_i = (region(ri, padded[0], win_h, shift[0]), region(ci, padded[1], win_w, shift[1]))
                regions_j = (region(rj, padded[0], win_h, shift[0]), region(cj, padded[1], win_w, shift[1]))
                if regions_i != regions_j:
                    bias[:, p + i, p + j] -= 100.0
    outs = []
    for head in range(heads):
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        scores = q @ k.T / math.sqrt(q.shape[-1]) + bias[head]
        outs.append(scores.softmax(dim=-1) @ v)
    return linear(attn.proj, torch.cat(outs, dim=-1))


def block_forward(block, x, prompts):
    """One image: x (H, W, C), prompts (p, C) -> both after the block."""
    height, width, dim = x.shape
    p, (win_h, win_w), shift = prompts.shape[0], block.window_size, block.shift_size
    h, h_prompts = layer_norm(block.norm1, x), layer_norm(block.norm1, prompts)
    h = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    padded = (math.ceil(height / win_h) * win_h, math.ceil(width / win_w) * win_w)
    grid = torch.zeros(*padded, dim)
    grid[:height, :width] = h
    out, prompt_outs = torch.zeros_like(grid), []
    for top in range(0, padded[0], win_h):
        for left in range(0, padded[1], win_w):
            coords = [(r, c) for r in range(top, top + win_h) for c in range(left, left + win_w)]
            tokens = torch.stack([grid[r, c] for r, c in coords])
            result = window_attention(block.attn, torch.cat([h_prompts, tokens]), coords, (win_h, win_w), shift,
                                      padded)
            prompt_outs.append(result[:p])
            for (r, c), row in zip(coords, result[p:], strict=True):
                out[r, c] = row
    attn_x = torch.roll(out[:height, :width], shifts=shift, dims=(0, 1))
    seq = torch.cat([prompts, x.reshape(-1, dim)]) + torch.cat([torch.stack(prompt_outs).mean(0),
                                                                 attn_x.reshape(-1, dim)])
    mlp = block.mlp
    seq = seq + linear(mlp.fc2, F.gelu(linear(mlp.fc1, layer_norm(block.norm2, seq))))
    return seq[p:].reshape(height, width, dim), seq[:p]


def merge(downsample, x, prompts):
    """PatchMerging (x0, x1, x2, x3 of the official code) and PromptedPatchMerging's 4x prompt concatenation."""
    x = torch.cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]], dim=-1)
    reduce = lambda t: linear(downsample.reduction, layer_norm(downsample.norm, t))  # noqa: E731
    return reduce(x), reduce(torch.cat([prompts] * 4, dim=-1))


def reference_logits(model, image: torch.Tensor, deep: bool) -> torch.Tensor:
    """The official PromptedSwinTransformer forward for one image (eval: no dropout)."""
    backbone, params = model.backbone, model.vpt_prompts
    shallow_prompt = params[0][0]  # the official prompt_embeddings; deep_prompt_embeddings_0 = params[0][1:]
    x = backbone.patch_embed.proj(image[None])[0].permute(1, 2, 0)  # (H, W, C0)
    x = layer_norm(backbone.patch_embed.norm, x)
    prompts = shallow_prompt
    for stage_index, stage in enumerate(backbone.layers):
        if stage_index > 0:  # the official code merges at the end of the previous stage: the same sequence
            x, prompts = merge(stage.downsample, x, prompts)
        for block_index, block in enumerate(stage.blocks):
            if deep and stage_index == 0 and block_index > 0:
                prompts = params[0][block_index]  # deep_prompt_embeddings_0[i - 1]
            elif deep and stage_index > 0:
                prompts = params[stage_index][block_index]  # deep_prompt_embeddings_s[i]
            x, prompts = block_forward(block, x, prompts)
    seq = layer_norm(backbone.norm, torch.cat([prompts, x.reshape(-1, x.shape[-1])]))
    return linear(backbone.get_classifier(), seq.mean(dim=0))  # avgpool over prompts and tokens


def build(method: str, **swin):
    torch.manual_seed(0)
    return create_method(method, make_tiny("swin", **swin), num_classes=3, prompt_length=3, prompt_dropout=0.0)


@pytest.mark.parametrize("swin", SWINS.values(), ids=SWINS.keys())
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_swin_vpt_equals_the_official_forward_written_out(deep, swin):
    model = build("vpt_deep" if deep else "vpt_shallow", **swin).eval()
    with torch.no_grad():
        for tensor in model.vpt_prompts:
            tensor.normal_()  # prompts that move the outputs well beyond the tolerance
        torch.nn.init.normal_(model.backbone.get_classifier().weight)
    size = model.backbone.patch_embed.img_size[0]
    # three images: an image's logits must not depend on the others (the official batched code mixes them)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images)
        expected = torch.stack([reference_logits(model, image, deep) for image in images])
        assert logits.abs().max() > 0.5
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        if deep:  # the comparison tells deep from shallow
            assert not torch.allclose(reference_logits(model, images[0], False), expected[0], atol=1e-3)


def test_swin_prompt_init_is_uniform_within_the_stage0_bound():
    torch.manual_seed(0)
    model = create_method("vpt_deep", make_tiny("swin"), num_classes=3, prompt_length=100)
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 24))  # the official `val`: patch 4, stage-0 width 24, for every stage
    assert [tuple(t.shape) for t in model.vpt_prompts] == [(2, 100, 24), (2, 100, 48)]
    for tensor in model.vpt_prompts:
        values = tensor.detach().flatten()
        assert values.abs().max() <= bound and values.max() > 0.98 * bound and values.min() < -0.98 * bound
        assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_swin_prompt_dropout_masks_each_image_in_training_only():
    torch.manual_seed(0)
    model = create_method("vpt_shallow", make_tiny("swin"), num_classes=3, prompt_dropout=0.5)
    image = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)  # the same image twice
    model.train()
    logits = model(image)
    assert not torch.allclose(logits[0], logits[1])  # a mask per image
    model.eval()
    logits = model(image)
    torch.testing.assert_close(logits[0], logits[1])


def test_swin_vpt_honours_gradient_checkpointing(monkeypatch):
    import methods.swin_prompts

    calls = []
    checkpoint = methods.swin_prompts.checkpoint
    monkeypatch.setattr(methods.swin_prompts, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    model = build("vpt_deep").train()  # frozen modules in eval mode: the tiny Swin's drop-path stays off
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = model(images)
    expected.sum().backward()
    grads = [t.grad.clone() for t in model.vpt_prompts]
    model.zero_grad()
    model.backbone.set_grad_checkpointing(True)
    logits = model(images)
    logits.sum().backward()
    torch.testing.assert_close(logits, expected)
    assert len(calls) == 4  # every block of both stages
    for grad, tensor in zip(grads, model.vpt_prompts, strict=True):
        torch.testing.assert_close(tensor.grad, grad)


# --- Swin-B (swin_base_patch4_window7_224, 200 classes): tuned parameters as the official code counts them -----
# (every tensor with requires_grad, the new head included: its log_model_info "Gradient Parameters"); the formula's
# pieces are tests/helpers/swin.py's
SWIN_B_COUNTS = {
    "linear": HEAD,
    "full": swin_b_total(),
    "vpt_shallow": 50 * 128 + HEAD,
    # the official prompt_embeddings (1, 50, 128) + deep_prompt_embeddings_0..3 (d0 - 1, d1, d2, d3 sets)
    "vpt_deep": 50 * (1 * 128 + (2 - 1) * 128 + 2 * 256 + 18 * 512 + 2 * 1024) + HEAD,  # 601,600 + 205,000
    "bias": (sum(d * 11 * c for c, d in zip(WIDTHS, DEPTHS, strict=True))  # qkv 3C, proj C, fc1 4C, fc2 C, 2 norms
             + 128 + 128 + sum(4 * c for c in WIDTHS[:-1]) + 1024 + HEAD),  # patch proj + norm, merge norms, norm
    "adapter": sum(d * (c * (c // 8) + c // 8 + (c // 8) * c + c) for c, d in zip(WIDTHS, DEPTHS, strict=True))
    + HEAD,
    "lora": sum(d * 2 * 8 * (c + c) for c, d in zip(WIDTHS, DEPTHS, strict=True)) + HEAD,  # q and v rows of qkv
    "partial_k": block_params(1024, 32) + 2 * 1024 + HEAD,  # k = 1: the last block and the final norm
    "mlp_k": 2 * (1024 * 1024 + 1024 + 2 * 1024) + HEAD,  # k = 3: two hidden Linear + LayerNorm layers
}


@pytest.mark.parametrize("method", SWIN_B_COUNTS)
def test_swin_b_tuned_parameters_follow_the_formula(method):
    options = {"prompt_length": 50} if method.startswith("vpt") else {}
    with torch.device("meta"):
        model = create_method(method, create_backbone("swin_base_patch4_window7_224"), num_classes=200, **options)
    assert model.tuned_params == SWIN_B_COUNTS[method]
    adds = method in ("vpt_shallow", "vpt_deep", "adapter", "lora", "mlp_k")  # new tensors (mlp_k: a new head)
    assert model.total_params == swin_b_total() + (SWIN_B_COUNTS[method] - HEAD if adds else 0)
    if method == "vpt_deep":
        assert model.tuned_params == 806_600  # quoted in docs/backbones.md


def test_make_params_counts_every_swin_method(capsys):
    from benchmark.params import main
    from methods.registry import methods_for_family

    assert main(["--backbone", "swin_base_patch4_window7_224", "--csv"]) == 0
    rows = [line.split(",") for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [row[0] for row in rows] == methods_for_family("swin")
    assert {row[0]: int(row[1]) for row in rows}["vpt_deep"] == SWIN_B_COUNTS["vpt_deep"]


# --- the other methods' placement on a Swin ------------------------------------------------------------------
def official_partial(name: str, k: int) -> bool:
    """The VPT code's Swin partial-1/2/4 filters (src/models/vit_models.py, class Swin) on timm names: its stage i
    merges at its end, timm's stage i + 1 at its start, so its `layers.2.downsample` is timm's `layers.3.downsample`."""
    if name in ("norm.weight", "norm.bias") or name.startswith("head."):
        return True
    if k == 1:
        return "layers.3.blocks.1." in name
    if k == 2:
        return "layers.3.blocks." in name
    return ("layers.3.blocks." in name or "layers.2.blocks.17." in name or "layers.2.blocks.16." in name
            or "layers.3.downsample." in name)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_swin_partial_k_is_the_official_partial(k):
    with torch.device("meta"):
        model = create_method("partial_k", create_backbone("swin_base_patch4_window7_224"), num_classes=200, k=k)
    tuned = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert tuned == {n for n, _ in model.backbone.named_parameters() if official_partial(n, k)}


def test_swin_adapter_sits_after_every_blocks_mlp():
    model = create_method("adapter", make_tiny("swin"), num_classes=3, reduction=4).eval()
    blocks = [block for stage in model.backbone.layers for block in stage.blocks]
    assert [a.down.out_features for a in model.adapters()] == [6, 6, 12, 12]  # width // 4 per stage
    x = torch.randn(2, 4, 4, 48)
    block = blocks[-1]
    with torch.no_grad():
        torch.nn.init.normal_(block.mlp.adapter.up.weight)
        adapter, mlp = block.mlp.adapter, block.mlp.mlp
        h = x + block._attn(layer_norm(block.norm1, x))  # the attention half, untouched
        m = linear(mlp.fc2, F.gelu(linear(mlp.fc1, layer_norm(block.norm2, h))))
        expected = h + m + linear(adapter.up, F.gelu(linear(adapter.down, m)))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)


def test_swin_lora_equals_the_backbone_with_merged_window_attention_weights():
    torch.manual_seed(0)
    backbone = make_tiny("swin")
    plain = copy.deepcopy(backbone)
    model = create_method("lora", backbone, num_classes=3, merge_for_eval=False).eval()
    with torch.no_grad():
        for layer in model.lora_layers():
            torch.nn.init.normal_(layer.lora_B)
    wrapped = {n.removeprefix("backbone.").rsplit(".", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {f"layers.{s}.blocks.{b}.attn.qkv" for s in range(2) for b in range(2)}  # targets=qv
    plain.reset_classifier(3)
    plain.head.fc.load_state_dict(model.backbone.get_classifier().state_dict())
    with torch.no_grad():
        for name in wrapped:  # the q rows [0, C) and v rows [2C, 3C) of qkv, each its own A (8, C) and B (C, 8)
            layer, weight = model.backbone.get_submodule(name), plain.get_submodule(name).weight
            c, (a, b) = weight.shape[1], (layer.lora_A, layer.lora_B)
            weight[:c] += layer.scaling * b[:c] @ a[:8]
            weight[2 * c:] += layer.scaling * b[c:] @ a[8:]
        images = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(images), plain.eval()(images), rtol=0, atol=1e-5)


def test_swin_linear_probe_reads_the_pooled_features():
    model = create_method("linear", make_tiny("swin"), num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    features = model.frozen_features(images).clone()
    expected = linear(model.backbone.head.fc, model.backbone.forward_features(images).mean(dim=(1, 2)))
    torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    model.read_features(True)
    torch.testing.assert_close(model(features), expected, rtol=0, atol=1e-5)


def test_swin_mlp_k_replaces_the_fc_after_the_pool():
    model = create_method("mlp_k", make_tiny("swin"), num_classes=3, k=3).eval()
    assert isinstance(model.backbone.head.fc, torch.nn.Sequential) and len(model.backbone.head.fc) == 9
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.backbone.forward_features(images).mean(dim=(1, 2))
        torch.testing.assert_close(model(images), model.backbone.head.fc(pooled), rtol=0, atol=1e-6)

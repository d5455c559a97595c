"""The zoo's methods on a timm Swin (issue 17), against formulas and references written here.

- counts: every zoo method that declares Swin, by formula per stage width C and depth d, on the tiny Swin of
  tests/helpers/models.py (C = 24, 48) and on Swin-B built on the meta device (C = 128, 256, 512, 1024);
- placement: one Swin block (shifted windows; the second stage's width; padded windows) of each block-modifying
  method against its forward written out here (prompt methods with the window's prompt rows and extra keys and
  values, and their whole forward through the stages), one image at a time, with a window attention of its own (roll,
  pad, windows, relative-position bias from the coordinates, shift mask from the regions), every sublayer a
  callable so that each method's changes enter where its paper (or the code named in its docstring) puts them;
- re-parameterisation: SSF and RepAdapter evaluate merged exactly as unmerged on a Swin, padded windows included;
- which tensors train (LN-tune, the peft tuners' layers) read by name as the reference code's filters would.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from backbones import create_backbone
from methods import create_method
from tests.helpers.models import TINY_METHOD_OPTIONS, make_tiny
from tests.helpers.sidetune import sidetune_count
from tests.helpers.swin import layer_norm, linear, region, swin_b_total
from tests.helpers.vit import rep_adapter

SWIN_B = SimpleNamespace(name="swin_base_patch4_window7_224", widths=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                         classes=200)
TINY = SimpleNamespace(widths=(24, 48), depths=(2, 2), classes=3)


# --- counts ------------------------------------------------------------------------------------------------------
def per_block(g, f) -> int:
    """Sum over every block of every stage of f(C), C the stage's width."""
    return sum(d * f(c) for c, d in zip(g.widths, g.depths, strict=True))


def head(g) -> int:
    return g.widths[-1] * g.classes + g.classes


def merges(g, f) -> int:
    """Sum over the patch merges (between stages: input widths C of every stage but the last) of f(C)."""
    return sum(f(c) for c in g.widths[:-1])


def layernorms(g) -> int:
    """patch-embedding norm, norm1 + norm2 of every block, every merge's norm over 4C, the final norm."""
    return 2 * g.widths[0] + per_block(g, lambda c: 4 * c) + merges(g, lambda c: 8 * c) + 2 * g.widths[-1]


def bottleneck_adapter(c: int, m: int) -> int:
    return c * m + m + m * c + c  # down C -> m and up m -> C, both with bias


def near_square(n: int) -> tuple[int, int]:
    """The divisor pair (a, b), a <= b, a * b = n, with the smallest sum: LoKr's split of a width (peft's -1)."""
    a = max(a for a in range(1, math.isqrt(n) + 1) if n % a == 0)
    return a, n // a


def lokr_layer(out: int, inp: int, r: int = 8) -> int:
    """W1 (a, c) full, W2 (b, d) full when r >= max(b, d) / 2, else W2a (b, r) W2b (r, d); out = a b, in = c d."""
    (a, b), (c, d) = near_square(out), near_square(inp)
    return a * c + (b * d if r >= max(b, d) / 2 else r * (b + d))


def dtl_read_widths(g) -> list[int]:
    """C of each block DTL reads by default on a Swin (ours; Swin-B: the code's --lora_before_blocks 4-23): the last
    two stages' blocks, the second half of them adding (the last n - n // 2 of n); a stage none of whose blocks adds
    left out (its side sum restarts at the stage's end)."""
    stages = [[c] * d for c, d in zip(g.widths, g.depths, strict=True)][-2:]
    first_add, kept, before = sum(map(len, stages)) // 2, [], 0
    for stage in stages:
        if before + len(stage) > first_add:  # the stage holds an adding block
            kept += stage
        before += len(stage)
    return kept


def dtl_fusion_widths(g) -> list[int]:
    """C of each stage with an adding block: DTL+ convolves its map (one depth-wise k x k per stage)."""
    return sorted(set(dtl_read_widths(g)))


def zoo_counts(g, frequencies: int = 1000, channels: int = 96) -> dict[str, int]:
    c0, last = g.widths[0], g.widths[-1]
    attention_mlp = {
        "ln_tune": layernorms(g),
        # patch projection and its norm; per block norm1 C, qkv 3C, proj C, norm2 C, fc1 4C, fc2 C; merge norms 4C
        "ssf": 2 * (c0 + c0) + per_block(g, lambda c: 2 * 11 * c) + merges(g, lambda c: 2 * 4 * c) + 2 * last,
        "adaptformer": per_block(g, lambda c: bottleneck_adapter(c, 64)),
        "houlsby": per_block(g, lambda c: 2 * bottleneck_adapter(c, 64)) + layernorms(g),
        # down C -> 8, 3x3 conv 8 -> 8, up 8 -> C, all with bias; two bypasses per block
        "convpass": per_block(g, lambda c: 2 * ((c * 8 + 8) + (8 * 8 * 9 + 8) + (8 * c + c))),
        # down C -> 8 with bias, up 8 -> C in 2 groups (C * 8 / 2) with bias; two adapters per block
        "repadapter": per_block(g, lambda c: 2 * ((c * 8 + 8) + (c * 8 // 2 + c))),
        # biases qkv 3C, proj C, fc1 4C, fc2 C; norm1, norm2 4C; gammas 2C; patch proj bias + norm; merge norms
        "difffit": per_block(g, lambda c: 9 * c + 4 * c + 2 * c) + 3 * c0 + merges(g, lambda c: 8 * c) + 2 * last,
        # rank 8 on qkv (C -> 3C) and proj (C -> C), plus DoRA's magnitude per output
        "dora": per_block(g, lambda c: 8 * (c + 3 * c) + 3 * c + 8 * (c + c) + c),
        "ia3": per_block(g, lambda c: 3 * c + 4 * c),  # qkv's outputs, fc2's inputs
        "loha": per_block(g, lambda c: 2 * 8 * ((3 * c + c) + (c + c))),
        "lokr": per_block(g, lambda c: lokr_layer(3 * c, c) + lokr_layer(c, c)),
        "vera": per_block(g, lambda c: (256 + 3 * c) + (256 + c)),  # d (r) and b (out) per layer
        # R: (in / 4) blocks of 4 x 4 = 4 in, s: out; qkv, proj, fc1, fc2
        "boft": per_block(g, lambda c: (4 * c + 3 * c) + (4 * c + c) + (4 * c + 4 * c) + (16 * c + c)),
        "fourierft": per_block(g, lambda c: 2 * frequencies),
        # p = 5 visual prompts of width C, and heads * T * d = T * C (T = 5) key-value rows, per block
        "e2vpt": per_block(g, lambda c: 5 * c + 5 * c),
        "sct": per_block(g, lambda c: channels * channels + channels),  # Linear(K, K) per block, any width C >= K
        "prefix": per_block(g, lambda c: 2 * 10 * c),  # p = 10 keys and 10 values of width C per block
        "dtl": sum(2 * 4 * c for c in dtl_read_widths(g)),  # A (4 x C) and B (C x 4) per read block (the code's r 4)
    }
    counts = {method: count + head(g) for method, count in attention_mlp.items()}
    counts["sidetune"] = sidetune_count(last, g.classes)
    return counts


SWIN_B_COUNTS = zoo_counts(SWIN_B)
# pretrained tensors each method trains beside what it adds (the head aside): what total_params does not grow by
PRETRAINED_TRAINED = {"ln_tune": layernorms(SWIN_B), "houlsby": layernorms(SWIN_B),
                      "difffit": zoo_counts(SWIN_B)["difffit"] - head(SWIN_B) - per_block(SWIN_B, lambda c: 2 * c)}


@pytest.mark.parametrize("method", SWIN_B_COUNTS)
def test_swin_b_tuned_parameters_follow_the_formula(method):
    with torch.device("meta"):
        model = create_method(method, create_backbone(SWIN_B.name), num_classes=200)
    assert model.tuned_params == SWIN_B_COUNTS[method]
    added = SWIN_B_COUNTS[method] - head(SWIN_B) - PRETRAINED_TRAINED.get(method, 0)
    assert model.total_params == swin_b_total() + added


def test_swin_b_counts_quoted_in_the_docs():
    assert {m: SWIN_B_COUNTS[m] for m in ("adaptformer", "convpass", "repadapter", "ssf", "ln_tune")} == {
        "adaptformer": 1_758_664, "convpass": 642_504, "repadapter": 518_216, "ssf": 479_432, "ln_tune": 262_600}
    assert SWIN_B_COUNTS["houlsby"] == 3_369_928 and SWIN_B_COUNTS["difffit"] == 395_080
    assert dtl_read_widths(SWIN_B) == [512] * 18 + [1024] * 2 and SWIN_B_COUNTS["dtl"] == 295_112


@pytest.mark.parametrize("g", [SWIN_B, TINY], ids=["swin_b", "tiny"])
def test_dtl_plus_adds_one_depthwise_conv_per_adding_stage(g):
    """DTL+ (the code's Swin scripts: fusion_size 5): k^2 C per stage whose blocks add, no bias."""
    with torch.device("meta"):
        backbone = create_backbone(SWIN_B.name) if g is SWIN_B else make_tiny("swin")
        model = create_method("dtl", backbone, num_classes=g.classes, fusion_size=5)
    assert model.tuned_params == zoo_counts(g)["dtl"] + sum(25 * c for c in dtl_fusion_widths(g))
    assert g is not SWIN_B or model.tuned_params == 333_512


# the formulas' arguments for TINY_METHOD_OPTIONS
TINY_FORMULA = {"fourierft": {"frequencies": 500}, "sct": {"channels": 8}}


@pytest.mark.parametrize("method", SWIN_B_COUNTS)
def test_tiny_swin_tuned_parameters_follow_the_formula(method):
    options = TINY_METHOD_OPTIONS.get((method, "swin"), {})
    with torch.device("meta"):
        model = create_method(method, make_tiny("swin"), num_classes=3, **options)
    assert model.tuned_params == zoo_counts(TINY, **TINY_FORMULA.get(method, {}))[method]


def test_houlsby_without_norms_trains_the_adapters_only():
    with torch.device("meta"):
        model = create_method("houlsby", create_backbone(SWIN_B.name), num_classes=200, train_norms=False)
    assert model.tuned_params == SWIN_B_COUNTS["houlsby"] - layernorms(SWIN_B) == 3_312_328


# --- one Swin block written out ----------------------------------------------------------------------------------
def window_attention(block, h: torch.Tensor, qkv, proj) -> torch.Tensor:
    """A Swin block's (shifted) window attention on one image's normed map h (H, W, C); `qkv` and `proj` map token
    rows. The map is rolled by -shift, zero-padded to whole windows (the padded rows enter qkv as any row), each
    window attends over itself head by head with the relative-position bias of its coordinates and -100 between
    different shift regions; the windows go back into the map, the padding is cut and the roll undone."""
    return prompted_window_attention(block, h, h.new_zeros(0, h.shape[-1]), None, qkv, proj)[0]


def prompted_window_attention(block, h: torch.Tensor, prompts: torch.Tensor, key_values, qkv, proj):
    """window_attention with the p (normed) prompt rows (p, C) before every window's tokens, and `key_values` (keys,
    values), each (heads, T, d), before every window's keys and values head by head; prompt rows and columns and the
    T columns get no relative-position bias and no shift mask. Returns the map and the prompts' outputs averaged
    over the windows (p, C)."""
    height, width, dim = h.shape
    attn, (win_h, win_w), shift = block.attn, block.window_size, block.shift_size
    heads, p = attn.num_heads, prompts.shape[0]
    keys, values = key_values if key_values is not None else (h.new_zeros(heads, 0, dim // heads),) * 2
    t = keys.shape[1]
    h = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    padded = (math.ceil(height / win_h) * win_h, math.ceil(width / win_w) * win_w)
    grid = torch.zeros(*padded, dim)
    grid[:height, :width] = h
    out, prompt_outs = torch.zeros_like(grid), []
    for top in range(0, padded[0], win_h):
        for left in range(0, padded[1], win_w):
            coords = [(r, c) for r in range(top, top + win_h) for c in range(left, left + win_w)]
            n = len(coords)
            rows = torch.cat([prompts, torch.stack([grid[r, c] for r, c in coords])])
            q, k, v = qkv(rows).reshape(p + n, 3, heads, -1).unbind(1)  # (p + n, heads, d)
            k, v = torch.cat([keys.transpose(0, 1), k]), torch.cat([values.transpose(0, 1), v])  # (T + p + n, ...)
            bias = torch.zeros(heads, p + n, t + p + n)
            for i, (ri, ci) in enumerate(coords):
                for j, (rj, cj) in enumerate(coords):
                    index = (ri - rj + win_h - 1) * (2 * win_w - 1) + (ci - cj + win_w - 1)
                    bias[:, p + i, t + p + j] = attn.relative_position_bias_table[index]
                    regions_i = (region(ri, padded[0], win_h, shift[0]), region(ci, padded[1], win_w, shift[1]))
                    regions_j = (region(rj, padded[0], win_h, shift[0]), region(cj, padded[1], win_w, shift[1]))
                    if any(shift) and regions_i != regions_j:
                        bias[:, p + i, t + p + j] -= 100.0
            scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1]) + bias
            rows = proj(torch.einsum("hij,jhd->ihd", scores.softmax(dim=-1), v).reshape(p + n, dim))
            prompt_outs.append(rows[:p])
            for (r, c), row in zip(coords, rows[p:], strict=True):
                out[r, c] = row
    return torch.roll(out[:height, :width], shifts=shift, dims=(0, 1)), torch.stack(prompt_outs).mean(dim=0)


def plain_ops(block) -> SimpleNamespace:
    """The pretrained block's sublayers (their weights alone), and branches that add nothing."""
    attn, mlp = block.attn, block.mlp
    return SimpleNamespace(
        norm1=lambda t: layer_norm(block.norm1, t), qkv=lambda t: linear(attn.qkv, t),
        proj=lambda t: linear(attn.proj, t), norm2=lambda t: layer_norm(block.norm2, t),
        fc1=lambda t: linear(mlp.fc1, t), fc2=lambda t: linear(mlp.fc2, t),
        attn_branch=lambda h, a: a, mlp_branch=lambda h, m: m, after_attn=lambda x: x)


def reference_block(block, x: torch.Tensor, ops: SimpleNamespace) -> torch.Tensor:
    """x (H, W, C) -> after_attn(x + attn_branch(h, attn(h))), h = norm1(x); then x + mlp_branch(h,
    fc2(gelu(fc1(h)))), h = norm2(x): each branch gets the sublayer's (normed) input and output."""
    h = ops.norm1(x)
    x = ops.after_attn(x + ops.attn_branch(h, window_attention(block, h, ops.qkv, ops.proj)))
    h = ops.norm2(x)
    return x + ops.mlp_branch(h, ops.fc2(F.gelu(ops.fc1(h))))


def bottleneck(a, t: torch.Tensor) -> torch.Tensor:
    """Houlsby's (methods/adapter.py's) adapter: up(gelu(down(t)))."""
    return linear(a.up, F.gelu(linear(a.down, t)))


def quick_gelu(t: torch.Tensor) -> torch.Tensor:
    return t * torch.sigmoid(1.702 * t)


def convpass_bypass(b, h: torch.Tensor) -> torch.Tensor:
    """Convpass_swin on one image's map h (H, W, C): down, QuickGELU, 3x3 conv over the whole map, QuickGELU, up."""
    z = quick_gelu(linear(b.adapter_down, h)).permute(2, 0, 1)[None]  # (1, d, H, W)
    z = F.conv2d(z, b.adapter_conv.weight, b.adapter_conv.bias, padding=1)[0].permute(1, 2, 0)
    return linear(b.adapter_up, quick_gelu(z))


def scaled(layer, y: torch.Tensor) -> torch.Tensor:
    return y * layer.ssf_scale + layer.ssf_shift


def salient_update(sct, x: torch.Tensor) -> torch.Tensor:
    """x with x[..., S] + W x[..., S] + b on the salient channels S only."""
    x, chosen = x.clone(), sct.channels
    x[..., chosen] = x[..., chosen] + linear(sct.adapt_linear, x[..., chosen])
    return x


def method_ops(method: str, block) -> SimpleNamespace:
    ops = plain_ops(block)
    if method == "adaptformer":  # beside the MLP, reading its input norm2(x) (V-PETL Bench's Swin)
        a = block.mlp.adaptmlp
        ops.mlp_branch = lambda h, m: m + 0.1 * linear(a.up_proj, F.relu(linear(a.down_proj, h)))
    elif method == "houlsby":  # after each sublayer, on its output
        ops.attn_branch = lambda h, a: a + bottleneck(block.adapter_attn, a)
        ops.mlp_branch = lambda h, m: m + bottleneck(block.adapter_mlp, m)
    elif method == "convpass":  # beside each sublayer, reading its input as a map, s = 1
        ops.attn_branch = lambda h, a: a + convpass_bypass(block.adapter_attn, h)
        ops.mlp_branch = lambda h, m: m + convpass_bypass(block.adapter_mlp, h)
    elif method == "ssf":  # gamma * y + beta after norm1, qkv, proj, norm2, fc1, fc2
        attn, mlp = block.attn, block.mlp
        ops.norm1 = lambda t: scaled(block.norm1, layer_norm(block.norm1, t))
        ops.qkv = lambda t: scaled(attn.qkv, linear(attn.qkv, t))
        ops.proj = lambda t: scaled(attn.proj, linear(attn.proj, t))
        ops.norm2 = lambda t: scaled(block.norm2, layer_norm(block.norm2, t))
        ops.fc1 = lambda t: scaled(mlp.fc1, linear(mlp.fc1, t))
        ops.fc2 = lambda t: scaled(mlp.fc2, linear(mlp.fc2, t))
    elif method == "difffit":  # per-channel gammas on both branches
        ops.attn_branch = lambda h, a: block.ls1.difffit_gamma * a
        ops.mlp_branch = lambda h, m: block.ls2.difffit_gamma * m
    elif method == "sct":  # x[S] += W x[S] + b on the residual stream between attention and MLP (the code's Swin)
        ops.after_attn = lambda x: salient_update(block.sct, x)
    elif method == "repadapter":  # A(t) = t + s up(down(t)) on the input of qkv (padded rows too) and of fc1
        attn, mlp = block.attn, block.mlp
        ops.qkv = lambda t: linear(attn.qkv, rep_adapter(block.adapter_attn, t, 1.0, 2))
        ops.fc1 = lambda t: linear(mlp.fc1, rep_adapter(block.adapter_mlp, t, 1.0, 2))
    return ops


BLOCK_METHODS = ["adaptformer", "houlsby", "convpass", "ssf", "difffit", "repadapter", "sct"]
SWINS = {"tiny": {}, "padded windows": dict(window_size=3)}  # 8x8 / 4x4 maps in 4x4 windows, or in 3x3 (padded)


def trained(method: str, **swin):
    """The method on a tiny Swin with every tuned backbone tensor moved off its init (zero branches matter)."""
    torch.manual_seed(0)
    model = create_method(method, make_tiny("swin", **swin), num_classes=3, **TINY_METHOD_OPTIONS.get((method, "swin"),
                                                                                                     {}))
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(0.3 * torch.randn_like(p))
        for name, chosen in model.backbone.named_buffers():  # SCT's salient channels: some of the block's, not 0..K-1
            if name.endswith("sct.channels"):
                width = model.backbone.get_submodule(name.removesuffix(".sct.channels")).dim
                chosen.copy_(torch.randperm(width)[:len(chosen)].sort().values)
    return model.eval()


@pytest.mark.parametrize("swin", SWINS.values(), ids=SWINS.keys())
@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_swin_block_equals_the_method_written_out(method, swin):
    model = trained(method, **swin)
    stages = model.backbone.layers
    for block in (stages[0].blocks[1], stages[1].blocks[0]):  # shifted windows at width 24; width 48
        height, width = block.input_resolution
        x = torch.randn(2, height, width, block.dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = torch.stack([reference_block(block, image, method_ops(method, block)) for image in x])
            plain = torch.stack([reference_block(block, image, plain_ops(block)) for image in x])
            torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)
        assert (expected - plain).abs().max() > 1e-2  # the method's changes are what the comparison sees


def test_the_plain_reference_is_timms_swin_block():
    backbone = make_tiny("swin", window_size=3).eval()
    for block in (backbone.layers[0].blocks[1], backbone.layers[1].blocks[1]):
        height, width = block.input_resolution
        x = torch.randn(2, height, width, block.dim)
        with torch.no_grad():
            expected = torch.stack([reference_block(block, image, plain_ops(block)) for image in x])
            torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)


def prompted_reference_block(block, x: torch.Tensor, prompts: torch.Tensor, key_values):
    """One image: x (H, W, C), prompts (p, C) -> both after the block (VPT's and E²VPT's PromptedSwinTransformerBlock):
    [prompts, tokens] take the window attention's outputs, then share norm2 and the MLP."""
    height, width, dim = x.shape
    ops = plain_ops(block)
    attn_x, attn_prompts = prompted_window_attention(block, ops.norm1(x), ops.norm1(prompts), key_values, ops.qkv,
                                                     ops.proj)
    seq = torch.cat([prompts, x.reshape(-1, dim)]) + torch.cat([attn_prompts, attn_x.reshape(-1, dim)])
    seq = seq + ops.fc2(F.gelu(ops.fc1(ops.norm2(seq))))
    return seq[len(prompts):].reshape(height, width, dim), seq[:len(prompts)]


def reference_prompted_model(model, images: torch.Tensor, stage_prompts, key_values_of) -> torch.Tensor:
    """Logits of a deep-prompted Swin, one image at a time: timm's patch embedding and merges, every block through
    prompted_reference_block with a fresh prompt set, then the final norm over prompts and tokens and their mean."""
    backbone, logits = model.backbone, []
    for image in images:
        x = backbone.patch_embed(image[None])[0]  # (H, W, C0)
        for s, stage in enumerate(backbone.layers):
            x = stage.downsample(x[None])[0]
            for b, block in enumerate(stage.blocks):
                x, prompts = prompted_reference_block(block, x, stage_prompts[s][b], key_values_of(block))
        rows = layer_norm(backbone.norm, torch.cat([prompts, x.flatten(0, 1)]))
        logits.append(linear(backbone.head.fc, rows.mean(dim=0)))
    return torch.stack(logits)


@pytest.mark.parametrize("swin", SWINS.values(), ids=SWINS.keys())
def test_e2vpt_block_attends_to_window_prompts_and_key_values(swin):
    model = trained("e2vpt", **swin)
    stages = model.backbone.layers
    for block in (stages[0].blocks[1], stages[1].blocks[0]):  # shifted windows at width 24; width 48
        height, width = block.input_resolution
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(2, height, width, block.dim, generator=generator)
        prompts = torch.randn(2, 5, block.dim, generator=generator)  # per image: images must not mix
        kv = (block.e2vpt_kv, block.e2vpt_kv)  # one tensor for keys and values (SHARE_PARAM_KV)
        with torch.no_grad():
            expected = [prompted_reference_block(block, *pair, kv) for pair in zip(x, prompts, strict=True)]
            without_kv = prompted_reference_block(block, x[0], prompts[0], None)
            out_x, out_prompts = block(x, prompts)
        torch.testing.assert_close(out_x, torch.stack([e[0] for e in expected]), rtol=0, atol=1e-5)
        torch.testing.assert_close(out_prompts, torch.stack([e[1] for e in expected]), rtol=0, atol=1e-5)
        assert (expected[0][0] - without_kv[0]).abs().max() > 1e-3  # the key-value prompts are what it sees


@pytest.mark.parametrize("swin", SWINS.values(), ids=SWINS.keys())
def test_prefix_block_attends_to_its_keys_and_values_in_every_window(swin):
    model = trained("prefix", **swin)
    stages = model.backbone.layers
    for block in (stages[0].blocks[1], stages[1].blocks[0]):  # shifted windows at width 24; width 48
        height, width = block.input_resolution
        heads, dim = block.attn.num_heads, block.dim
        x = torch.randn(2, height, width, dim, generator=torch.Generator().manual_seed(1))
        keys, values = (t.reshape(10, heads, dim // heads).transpose(0, 1) for t in block.prefix_kv)  # (H, p, d)
        none = torch.zeros(0, dim)
        with torch.no_grad():
            expected = torch.stack([prompted_reference_block(block, image, none, (keys, values))[0] for image in x])
            swapped = prompted_reference_block(block, x[0], none, (values, keys))[0]
            torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)
        assert (expected[0] - swapped).abs().max() > 1e-3  # keys and values are two tensors, each in its place
    assert [tuple(b.prefix_kv.shape) for s in stages for b in s.blocks] == [(2, 10, 24)] * 2 + [(2, 10, 48)] * 2
    with pytest.raises(ValueError, match="widths differ per stage: use projection_dim=0"):
        create_method("prefix", make_tiny("swin"), num_classes=3, projection_dim=8)


def test_e2vpt_logits_follow_the_stages_written_out():
    """Fresh prompts of the stage's width before every block, merges by timm's own, prompts pooled with the tokens."""
    model = trained("e2vpt", window_size=3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_prompted_model(model, images, model.e2vpt_prompts, lambda b: (b.e2vpt_kv, b.e2vpt_kv))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    assert [tuple(t.shape) for t in model.e2vpt_prompts] == [(2, 5, 24), (2, 5, 48)]
    fresh = create_method("e2vpt", make_tiny("swin"), num_classes=3)
    bound = math.sqrt(6 / (3 * 4 * 4 + 24))  # VPT's bound with the stage-0 width, every stage
    assert all(t.abs().max() <= bound for t in fresh.e2vpt_prompts)
    for block in (b for stage in fresh.backbone.layers for b in stage.blocks):  # (heads, T, d), Kaiming over T * d
        assert block.e2vpt_kv.shape == (block.attn.num_heads, 5, 24)
        assert 0.9 * math.sqrt(6 / (5 * 24)) < block.e2vpt_kv.abs().max() <= math.sqrt(6 / (5 * 24))


@pytest.mark.parametrize("swin", SWINS.values(), ids=SWINS.keys())
@pytest.mark.parametrize("method", ["ssf", "repadapter"])
def test_swin_merged_evaluation_equals_unmerged(method, swin):
    model = trained(method, **swin)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(images)
        model.merge_layers()
        merged = model(images)
        model.unmerge_layers()
        torch.testing.assert_close(model(images), unmerged, rtol=0, atol=0)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_ssf_follows_the_official_swin_sites():
    """SSF's official Swin: patch proj + norm, six sites per block, each merge's norm (over 4C), the final norm."""
    model = create_method("ssf", make_tiny("swin"), num_classes=3)
    scaled_layers = {n.removeprefix("backbone.").removesuffix(".ssf_scale") for n, _ in model.named_parameters()
                     if n.endswith("ssf_scale")}
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    assert scaled_layers == {"patch_embed.proj", "patch_embed.norm", "layers.1.downsample.norm", "norm"} | {
        f"layers.{s}.blocks.{b}.{site}" for s in range(2) for b in range(2) for site in block}
    assert model.backbone.layers[1].downsample.norm.ssf_scale.shape == (4 * 24,)


def test_sct_selects_each_blocks_channels_over_its_stage_width():
    """Per block, norm2's input over all tokens (no CLS on a Swin), per class sqrt(sum x^2) per channel of the stage's
    width, the mean over the classes, the K largest: the ViT's scores, measured on the plain pretrained blocks."""
    def loud_first_token(_block, inputs):  # the top-left token loud in channel 7: salient only where it counts
        x = inputs[0].clone()
        x[:, 0, 0, 7] = 100.0
        return (x,)

    torch.manual_seed(0)
    plain = make_tiny("swin").eval()
    plain.layers[0].blocks[0].register_forward_pre_hook(loud_first_token)
    model = create_method("sct", copy.deepcopy(plain), num_classes=3, channels=5)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(7, 3, 32, 32, generator=g), torch.tensor([0, 2, 0, 2, 2, 0, 2])
    model.select_from_data(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=3))
    expected = []
    with torch.no_grad():
        x = plain.patch_embed(images)
        for stage in plain.layers:
            x = stage.downsample(x)
            for block in stage.blocks:
                rows = (x + block._attn(block.norm1(x))).flatten(1, 2)  # (B, H*W, C)
                norms = torch.stack([rows[labels == c].square().sum(dim=(0, 1)).sqrt() for c in (0, 2)])
                expected.append(sorted(norms.mean(dim=0).topk(5).indices.tolist()))
                x = block(x)
    blocks = [b for stage in model.backbone.layers for b in stage.blocks]
    assert [b.sct.channels.tolist() for b in blocks] == expected
    assert 7 in expected[0] and any(max(chosen) >= 24 for chosen in expected)  # stage 1 chooses among its 48


def reference_dtl_logits(model, images: torch.Tensor, read: set[int], add: set[int], pool: str) -> torch.Tensor:
    """The code's Swin DTL (models/swin_transformer.py BasicLayer.forward): per stage the side sum restarts from 0;
    before a read block i it gains x B_i A_i, after an adding block x += fuse(swish(sum)), fuse the stage's depth-wise
    conv over the (H, W) map (DTL+) or nothing; blocks (0-based over the stages) are timm's, untouched. Head: norm,
    then the map's mean (the code's), or the mean, then norm (patch_mean)."""
    backbone, beta, i = model.backbone, model.options.beta, 0
    x = backbone.patch_embed(images)  # (B, H, W, C0)
    for s, stage in enumerate(backbone.layers):
        x, side = stage.downsample(x), 0.0
        for block in stage.blocks:
            if i in read:
                low_rank = model.dtl_side[str(i)]
                side = side + x @ low_rank.down.weight.T @ low_rank.up.weight.T
            x = block(x)
            if i in add:
                act = side * torch.sigmoid(beta * side)
                if model.dtl_fusion is not None:
                    w = model.dtl_fusion[str(s)].weight  # (C, 1, k, k)
                    act = F.conv2d(act.permute(0, 3, 1, 2), w, padding=w.shape[-1] // 2, groups=len(w))
                    act = act.permute(0, 2, 3, 1)
                x = x + act
            i += 1
    pooled = backbone.norm(x).mean(dim=(1, 2)) if pool == "backbone" else backbone.norm(x.mean(dim=(1, 2)))
    return linear(backbone.head.fc, pooled)


@pytest.mark.parametrize(("options", "read", "add"), [
    ({}, {2, 3}, {2, 3}),  # ours: the last two stages read, the second half adds, stage 0 (no add) left out
    ({"read_blocks": "1-4", "add_blocks": "2+4", "fusion_size": 3}, {0, 1, 2, 3}, {1, 3}),  # both stages add
    ({"read_blocks": "2-4", "add_blocks": "2-3", "pool": "patch_mean", "fusion_size": 5}, {1, 2, 3}, {1, 2}),
    ({"add_blocks": "1"}, {0, 1}, {0}),  # stage 0 adds: the default read keeps its blocks, drops stage 1's
], ids=["default", "both stages add, DTL+ 3", "patch_mean, DTL+ 5", "stage 0 adds"])
def test_dtl_side_sums_restart_per_stage_and_add_after_the_chosen_blocks(options, read, add):
    torch.manual_seed(0)
    model = create_method("dtl", make_tiny("swin"), num_classes=3, beta=2.0, **options).eval()
    assert set(model.dtl_side) == {str(i) for i in read} and model.add_after == add
    with torch.no_grad():
        for side in model.dtl_side.values():
            side.up.weight.normal_(std=0.5)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_dtl_logits(model, images, read, add, options.get("pool", "backbone"))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        assert (expected - reference_dtl_logits(model, images, set(), set(), "backbone")).abs().max() > 1e-3
    assert all(model.dtl_side[str(i)].up.weight.shape[0] == (24 if i < 2 else 48) for i in read)  # its block's C
    assert all(model.dtl_side[str(i)].down.weight.shape[0] == 4 for i in read)  # the code's Swin rank 4


def test_dtl_on_swin_b_reads_and_adds_the_code_blocks():
    """The code's Swin-B scripts: --lora_before_blocks 4-23 --add_after_blocks 14-23 (0-based); one conv per adding
    stage (stages 2 and 3) for DTL+."""
    with torch.device("meta"):
        model = create_method("dtl", create_backbone(SWIN_B.name), num_classes=200, fusion_size=5)
    assert sorted(map(int, model.dtl_side)) == list(range(4, 24)) and model.add_after == set(range(14, 24))
    assert {s: tuple(c.weight.shape) for s, c in model.dtl_fusion.items()} == {"2": (512, 1, 5, 5),
                                                                               "3": (1024, 1, 5, 5)}


def test_dtl_on_swin_starts_as_the_plain_swin():
    """B zero: the side sum is 0 and swish(0) = 0; the code's head is timm's Swin head (norm, average, linear)."""
    torch.manual_seed(0)
    plain = make_tiny("swin").eval()
    model = create_method("dtl", copy.deepcopy(plain), num_classes=3, fusion_size=5).eval()
    plain.reset_classifier(3)
    plain.head = copy.deepcopy(model.backbone.head)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))


@pytest.mark.parametrize(("options", "message"), [
    ({"read_blocks": "1-4", "add_blocks": "4"}, r"dtl read block\(s\) \[1, 2\] lie in a stage with no add_blocks"),
    ({"read_blocks": "1+4", "add_blocks": "2-3"}, r"after block 3, but the first block that feeds it in its stage "
                                                  r"\(blocks 3-4\) is 4"),
], ids=["read stage without an add", "add before its stage's first read"])
def test_dtl_refuses_reads_that_cannot_reach_an_add_of_their_stage(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("dtl", make_tiny("swin"), num_classes=3, **options)


def test_block_methods_keep_the_backbones_keys():
    plain = set(make_tiny("swin").state_dict())
    for method in BLOCK_METHODS:
        options = TINY_METHOD_OPTIONS.get((method, "swin"), {})
        keys = set(create_method(method, make_tiny("swin"), num_classes=3, **options).backbone.state_dict())
        assert plain <= keys, method
    keys = set(create_method("adaptformer", make_tiny("swin"), num_classes=3).backbone.state_dict())
    assert "layers.1.blocks.0.mlp.adaptmlp.down_proj.weight" in keys  # V-PETL Bench's name


def test_adapters_take_their_blocks_width():
    widths = {"adaptformer": lambda a: a.down_proj.in_features, "houlsby": lambda a: a.down.in_features,
              "convpass": lambda b: b.adapter_down.in_features, "repadapter": lambda a: a.down.in_features}
    for method, width in widths.items():
        model = create_method(method, make_tiny("swin"), num_classes=3)
        adapters = getattr(model, "bypasses" if method == "convpass" else "adapters")()
        per_block = 1 if method == "adaptformer" else 2
        assert [width(a) for a in adapters] == [24] * 2 * per_block + [48] * 2 * per_block, method


# --- which tensors train, by name --------------------------------------------------------------------------------
def test_ln_tune_trains_what_v_petl_benchs_norm_filter_selects():
    model = create_method("ln_tune", make_tiny("swin"), num_classes=3)
    names = [n for n, _ in model.backbone.named_parameters()]
    tuned = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert tuned == {n for n in names if "norm" in n or "head" in n}  # train_model_lntune.py's filter
    assert "layers.1.downsample.norm.weight" in tuned


@pytest.mark.parametrize(("method", "layers"), [
    ("dora", ("attn.qkv", "attn.proj")), ("loha", ("attn.qkv", "attn.proj")), ("lokr", ("attn.qkv", "attn.proj")),
    ("vera", ("attn.qkv", "attn.proj")), ("fourierft", ("attn.qkv", "attn.proj")), ("ia3", ("attn.qkv", "mlp.fc2")),
    ("boft", ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
])
def test_peft_tuners_adapt_the_same_layers_of_every_swin_block(method, layers):
    model = create_method(method, make_tiny("swin"), num_classes=3, **TINY_METHOD_OPTIONS.get((method, "swin"), {}))
    assert set(model.peft_layers()) == {f"layers.{s}.blocks.{b}.{layer}" for s in range(2) for b in range(2)
                                        for layer in layers}
    if method == "ia3":  # the FFN vector scales fc2's input, the attention one qkv's output
        assert all(layer.is_feedforward == name.endswith("fc2") for name, layer in model.peft_layers().items())


def test_sidetune_blends_the_swins_pooled_feature():
    torch.manual_seed(0)
    model = create_method("sidetune", make_tiny("swin"), num_classes=3, side_input_size=64).eval()
    with torch.no_grad():
        model.side_alpha.fill_(0.4)
        images = torch.randn(2, 3, 32, 32)
        pooled = model.backbone.forward_features(images).mean(dim=(1, 2))  # the final norm's map, averaged
        alpha = torch.sigmoid(torch.tensor(0.4))
        expected = linear(model.backbone.head.fc, alpha * pooled + (1 - alpha) * model.side_features(images))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)


def test_vit_only_methods_say_why_in_one_line():
    for method in ("fact_tt", "fact_tk", "vqt"):
        with torch.device("meta"), pytest.raises(ValueError) as err:
            create_method(method, make_tiny("swin"), num_classes=3)
        assert "\n" not in str(err.value) and "it supports: vit." in str(err.value)


def test_copies_keep_repadapters_references():
    """RepAdapter's qkv / fc1 reference their block's adapters: a deep copy (checkpoint averaging, a sweep's
    restarts) must reference the copy's own."""
    model = trained("repadapter")
    clone = copy.deepcopy(model)
    for block in (b for stage in clone.backbone.layers for b in stage.blocks):
        assert block.attn.qkv.adapter[0] is block.adapter_attn and block.mlp.fc1.adapter[0] is block.adapter_mlp

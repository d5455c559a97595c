"""FacT-TT and FacT-TK against the official forward written out here (github:JieShibo/PETL-ViT, FacT/fact_tt.py and
FacT/fact_tk.py: fact_forward_attn / fact_forward_mlp), their counts by formula at the defaults chosen from the
official VTAB configs (TT d = 8, s = 1; TK d = 32, s = 10), the code's init (V zero, so the pretrained function at
start; C and P Xavier-uniform) and dropout on the core's output."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from methods import create_method
from methods.fact import FacTLinear
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import train_steps
from tests.helpers.vit import embed

D, C, DEPTH = 768, 200, 12
HEAD = D * C + C


def fact_tt_count(d: int) -> int:
    """U (D x d) and V (d x D) shared; per layer q, k, v, o cores d x d, fc1 d x 4d, fc2 4d x d (fact_tt.py)."""
    return 2 * D * d + DEPTH * (4 * d * d + 4 * d * d + 4 * d * d)


def fact_tk_count(d: int) -> int:
    """U, V; the core FacTc (d, d, d) and FacTp (d, 144 = 12 layers x (4 + 8)) (fact_tk.py)."""
    return 2 * D * d + d ** 3 + d * 12 * DEPTH


@pytest.mark.parametrize(("method", "count"), [("fact_tt", fact_tt_count(8) + HEAD), ("fact_tk",
                                                                                     fact_tk_count(32) + HEAD)])
def test_vit_b_counts_at_the_defaults(method, count, vit_b):
    model = create_method(method, vit_b, num_classes=C)
    assert model.tuned_params == count
    assert model.total_params == 85_952_456 + count - HEAD


def test_vit_b_counts_written_out():
    assert fact_tt_count(8) + HEAD == 21_504 + HEAD == 175_304
    assert fact_tk_count(32) + HEAD == 49_152 + 32_768 + 4_608 + HEAD == 240_328


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_wraps_qkv_proj_fc1_fc2_and_trains_only_the_factors_and_head(method, tiny_batch):
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3, dim=4)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, FacTLinear)}
    assert wrapped == {f"backbone.blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                                "mlp.fc2")}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    shared = {"backbone.fact.u.weight", "backbone.fact.v.weight"}
    if method == "fact_tk":
        expected = shared | {"backbone.fact.core", "backbone.fact.p"}
    else:
        expected = shared | {f"backbone.blocks.{i}.{s}.weight" for i in range(2) for s in (
            "attn.qkv.fact_q", "attn.qkv.fact_k", "attn.qkv.fact_v", "attn.proj.fact_o", "mlp.fc1.fact_t",
            "mlp.fc2.fact_t")}
    assert trained == expected | {"backbone.head.weight", "backbone.head.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny_batch)  # two steps: U and the cores only see error once V left zero
    assert {n for n, p in model.named_parameters() if not torch.equal(p, before[n])} == trained


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_starts_as_the_pretrained_function_and_keeps_state_dict_keys(method, tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = copy.deepcopy(backbone).eval()
    model = create_method(method, backbone, num_classes=3).train()  # dropout on: V = 0 still gives no update
    assert model.backbone.fact.v.weight.abs().sum() == 0 and model.backbone.fact.u.weight.abs().sum() > 0
    assert set(plain.state_dict()) - {"head.weight", "head.bias"} < set(model.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.forward_features(tiny_batch[0]),
                                   plain.forward_features(tiny_batch[0]), rtol=0, atol=0)


def test_init_bounds_are_the_codes():
    """nn.Linear's default for U and the TT cores (bound 1 / sqrt(fan_in)); Xavier-uniform C (fan_in = fan_out = d^2:
    bound sqrt(3) / d) and P (bound sqrt(6 / (12 L + d)))."""
    torch.manual_seed(0)
    tt = create_method("fact_tt", make_tiny_vit(), num_classes=3, dim=16)
    u = tt.backbone.fact.u.weight
    assert u.shape == (16, 32) and u.abs().max() <= 1 / math.sqrt(32) and u.abs().max() > 0.95 / math.sqrt(32)
    core = tt.backbone.blocks[0].mlp.fc2.fact_t.weight  # Linear(4d, d)
    assert core.shape == (16, 64) and core.abs().max() <= 1 / 8 and core.abs().max() > 0.95 / 8
    tk = create_method("fact_tk", make_tiny_vit(), num_classes=3, dim=16)
    c, p = tk.backbone.fact.core, tk.backbone.fact.p
    assert c.shape == (16, 16, 16) and c.abs().max() <= math.sqrt(3) / 16 and c.abs().max() > 0.99 * math.sqrt(3) / 16
    assert p.shape == (16, 24)
    bound = math.sqrt(6 / (24 + 16))
    assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound


def official_attn(attn, x, tucker, fact, idx):
    """fact_forward_attn of the official code, with its names (FacTu/v, per-layer FacTs or FacTc @ FacTp)."""
    B, N, Cw = x.shape
    FacTu, FacTv = fact.u, fact.v
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    if tucker:
        FacTc = fact.core @ fact.p[:, idx:idx + 4]
        q_c, k_c, v_c, proj_c = FacTc[:, :, 0], FacTc[:, :, 1], FacTc[:, :, 2], FacTc[:, :, 3]
        q, k, v = (FacTv(FacTu(x) @ c) for c in (q_c, k_c, v_c))
    else:
        q = FacTv(attn.qkv.fact_q(FacTu(x)))
        k = FacTv(attn.qkv.fact_k(FacTu(x)))
        v = FacTv(attn.qkv.fact_v(FacTu(x)))
    qkv = qkv + torch.cat([q, k, v], dim=2) * attn.qkv.scale
    qkv = qkv.reshape(B, N, 3, 2, Cw // 2).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = ((q @ k.transpose(-2, -1)) * (Cw // 2) ** -0.5).softmax(dim=-1)
    x = (a @ v).transpose(1, 2).reshape(B, N, Cw)
    proj = F.linear(x, attn.proj.weight, attn.proj.bias)
    delta = FacTv(FacTu(x) @ proj_c) if tucker else FacTv(attn.proj.fact_o(FacTu(x)))
    return proj + delta * attn.proj.scale


def official_mlp(mlp, x, tucker, fact, idx, dim):
    B, N, Cw = x.shape
    FacTu, FacTv, s = fact.u, fact.v, mlp.fc1.scale
    h = F.linear(x, mlp.fc1.weight, mlp.fc1.bias)
    if tucker:
        FacTc = fact.core @ fact.p[:, idx:idx + 8]
        fc1_c, fc2_c = FacTc[:, :, :4].reshape(dim, dim * 4), FacTc[:, :, 4:].reshape(dim, dim * 4)
        h = h + FacTv((FacTu(x) @ fc1_c).reshape(B, N, 4, dim)).reshape(B, N, 4 * Cw) * s
    else:
        h = h + FacTv(mlp.fc1.fact_t(FacTu(x)).reshape(B, N, 4, dim)).reshape(B, N, 4 * Cw) * s
    x = F.gelu(h)
    h = F.linear(x, mlp.fc2.weight, mlp.fc2.bias)
    x = x.reshape(B, N, 4, Cw)
    if tucker:
        h = h + FacTv(FacTu(x).reshape(B, N, 4 * dim) @ fc2_c.t()) * s
    else:
        h = h + FacTv(mlp.fc2.fact_t(FacTu(x).reshape(B, N, 4 * dim))) * s
    return h


@pytest.mark.parametrize(("method", "options"), [("fact_tt", {}), ("fact_tt", {"dim": 3, "scale": 10.0}),
                                                  ("fact_tk", {"dim": 4}), ("fact_tk", {"dim": 5, "scale": 0.1})])
def test_forward_is_the_official_one(method, options):
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3, **options).eval()
    fact, tucker = model.backbone.fact, method == "fact_tk"
    dim = options.get("dim", 8)
    with torch.no_grad():
        fact.v.weight.normal_(std=0.5)  # a trained V: the updates are not zero
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    backbone = model.backbone
    with torch.no_grad():
        x = embed(backbone, images)
        idx = 0  # the code's vit.idx: +4 per Attention, +8 per Mlp, in forward order
        for block in backbone.blocks:
            x = x + official_attn(block.attn, block.norm1(x), tucker, fact, idx)
            x = x + official_mlp(block.mlp, block.norm2(x), tucker, fact, idx + 4, dim)
            idx += 12
        expected = backbone.head(backbone.norm(x)[:, 0])
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
        fact.v.weight.zero_()  # and the updates matter at this tolerance
        assert not torch.allclose(model(images), expected, atol=1e-3)


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_dropout_acts_on_the_update_in_training_only(method, tiny_batch):
    torch.manual_seed(0)
    model = create_method(method, make_tiny_vit(), num_classes=3)
    assert {m.dropout.p for m in model.fact_layers()} == {0.1}
    with torch.no_grad():
        model.backbone.fact.v.weight.normal_(std=0.5)
        model.eval()
        first, second = model(tiny_batch[0]), model(tiny_batch[0])
        assert torch.equal(first, second)
        model.train()
        assert not torch.allclose(model(tiny_batch[0]), first, atol=1e-4)
        quiet = create_method(method, make_tiny_vit(), num_classes=3, dropout=0.0)
        quiet.load_state_dict(model.state_dict())
        torch.testing.assert_close(quiet.train()(tiny_batch[0]), first, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"dim": 0}, r"FacT dim must be a positive integer \(the factor rank d, e.g. 8\), got 0"),
    ({"dim": 2.5}, "FacT dim must be a positive integer"),
    ({"scale": 0}, r"FacT scale must be a positive number \(the code's s: 0.01-100\), got 0"),
    ({"scale": "big"}, "FacT scale must be a positive number"),
    ({"dropout": 1.0}, r"FacT dropout must be a number in \[0, 1\), got 1.0"),
    ({"rank": 8}, "has no option"),
])
@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_bad_options_name_the_problem(method, options, message):
    with pytest.raises(ValueError, match=message):
        create_method(method, make_tiny_vit(), num_classes=3, **options)


def test_an_mlp_ratio_other_than_4_is_refused():
    with pytest.raises(ValueError, match=r"fc1 \(D -> 4D\)"):
        create_method("fact_tt", make_tiny_vit(mlp_ratio=2.0), num_classes=3)


def test_dropout_is_on_the_cores_output_before_v():
    """The code's V(dp(core(U x))): replaying the same random stream, every site's update equals one written out
    with F.dropout on the core's output (q, k, v in that order for qkv)."""
    torch.manual_seed(0)
    model = create_method("fact_tt", make_tiny_vit(), num_classes=3, dim=4, dropout=0.5).train()
    fact = model.backbone.fact
    with torch.no_grad():
        fact.v.weight.normal_(std=0.5)
    attn, mlp = model.backbone.blocks[0].attn, model.backbone.blocks[0].mlp
    x, hidden = torch.randn(2, 5, 32), torch.randn(2, 5, 128)

    def drop(t):
        return F.dropout(t, 0.5, training=True)

    cases = [
        (attn.qkv, x, lambda: torch.cat([fact.v(drop(core(fact.u(x)))) for core in (attn.qkv.fact_q, attn.qkv.fact_k,
                                                                                   attn.qkv.fact_v)], dim=-1)),
        (attn.proj, x, lambda: fact.v(drop(attn.proj.fact_o(fact.u(x))))),
        (mlp.fc1, x, lambda: fact.v(drop(mlp.fc1.fact_t(fact.u(x))).reshape(2, 5, 4, 4)).reshape(2, 5, 128)),
        (mlp.fc2, hidden, lambda: fact.v(drop(mlp.fc2.fact_t(fact.u(hidden.reshape(2, 5, 4, 32)).reshape(2, 5, 16))))),
    ]
    with torch.no_grad():
        for layer, inputs, reference in cases:
            torch.manual_seed(5)
            got = layer.delta(inputs)
            torch.manual_seed(5)
            torch.testing.assert_close(got, reference(), rtol=0, atol=1e-6, msg=layer.site)


def test_defaults_are_the_chosen_official_configs():
    """TT: d = 8, s = 1 (configs/tt/cifar.yaml, PETL_Vision's default_vtab); TK: d = 32, s = 10 (configs/tk: the most
    common rank, and its most common scale); dropout 0.1 (the code's nn.Dropout(0.1))."""
    tt = create_method("fact_tt", make_tiny_vit(), num_classes=3)
    tk = create_method("fact_tk", make_tiny_vit(), num_classes=3)
    assert (tt.options.dim, tt.options.scale, tt.options.dropout) == (8, 1.0, 0.1)
    assert (tk.options.dim, tk.options.scale, tk.options.dropout) == (32, 10.0, 0.1)
    assert {layer.scale for layer in tt.fact_layers()} == {1.0}
    assert {layer.scale for layer in tk.fact_layers()} == {10.0}

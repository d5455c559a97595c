"""peft's tuners through methods/peft_tuners.py: the ViT-B/16 counts by formula, each tuner's forward on one layer
against a hand-written reference, which layers are wrapped, identity at init where the paper starts there, what
trains and what never moves, evaluation that never writes W, and peft's LoRA against our hand-written LoRA."""

from __future__ import annotations

import copy
import math

import lightning as L
import peft
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmark.params import count_params
from methods import create_method
from methods.lora import LoRALinear
from tests.helpers.models import make_tiny_vit
from tests.helpers.training import train_steps

TUNERS = ["dora", "ia3", "loha", "lokr", "vera", "boft", "fourierft"]
D, C, DEPTH = 768, 200, 12
HEAD = D * C + C
QKV, PROJ, FC1, FC2 = (D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)  # (in, out) of ViT-B/16's block linears


def lora_like(rank: int, *layers) -> int:
    return sum(rank * (fan_in + fan_out) for fan_in, fan_out in layers)


# Each count from its tuner's formula (methods/peft_tuners.py docstrings), per block, then 12 blocks and the head.
VIT_B_COUNTS = {
    "dora": DEPTH * (lora_like(8, QKV, PROJ) + 3 * D + D) + HEAD,  # LoRA's A, B + one magnitude per output
    "ia3": DEPTH * (3 * D + 4 * D) + HEAD,  # the qkv output vector + fc2's input vector
    "loha": DEPTH * 2 * lora_like(8, QKV, PROJ) + HEAD,  # two rank-8 pairs per layer
    # LoKr, 2304 = 48 * 48, 768 = 24 * 32: W1 (48, 24) + W2a (48, 8) + W2b (8, 32); proj W1 (24, 24) + (32, 8) + (8, 32)
    "lokr": DEPTH * ((48 * 24 + 48 * 8 + 8 * 32) + (24 * 24 + 32 * 8 + 8 * 32)) + HEAD,
    "vera": DEPTH * ((256 + 3 * D) + (256 + D)) + HEAD,  # lambda_d (r) + lambda_b (out) per layer
    "boft": DEPTH * (3 * (D // 4) * 16 + (4 * D // 4) * 16 + (3 * D + D + 4 * D + D)) + HEAD,  # 4x4 blocks + scales
    "fourierft": DEPTH * 2 * 1000 + HEAD,  # 1000 coefficients on qkv and on proj
}


def test_vit_b_counts_match_the_formulas():
    table = count_params("vit_base_patch16_224", C, methods=TUNERS).set_index("method")
    assert {m: int(table.loc[m, "tuned_params"]) for m in TUNERS} == VIT_B_COUNTS
    assert VIT_B_COUNTS["dora"] == 633_032  # the number


ATTENTION = {f"blocks.{i}.attn.{name}" for i in range(2) for name in ("qkv", "proj")}
WRAPPED = {"ia3": {f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "mlp.fc2")},
           "boft": ATTENTION | {f"blocks.{i}.mlp.{name}" for i in range(2) for name in ("fc1", "fc2")}}
TRAINED = {"dora": ("lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"),
           "ia3": ("ia3_l.default",), "loha": tuple(f"hada_w{i}_{ab}.default" for i in (1, 2) for ab in "ab"),
           "lokr": ("lokr_w1.default", "lokr_w2.default"), "vera": ("vera_lambda_b.default", "vera_lambda_d.default"),
           "boft": ("boft_R.default", "boft_s.default"), "fourierft": ("fourierft_spectrum.default",)}


def tuner(method: str, **options):
    torch.manual_seed(0)
    return create_method(method, make_tiny_vit(), num_classes=3, **options)


@pytest.mark.parametrize("method", TUNERS)
def test_wraps_exactly_its_layers_and_trains_only_its_tensors_and_the_head(method):
    model = tuner(method)
    wrapped = set(model.peft_layers())
    assert wrapped == WRAPPED.get(method, ATTENTION)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"backbone.{layer}.{name}" for layer in wrapped for name in TRAINED[method]}
    assert trained == expected | {"backbone.head.weight", "backbone.head.bias"}
    plain = set(make_tiny_vit().state_dict())
    renamed = {f"{layer}.{p}" for layer in wrapped for p in ("weight", "bias")}
    kept = set(model.backbone.state_dict())
    assert plain - renamed <= kept and {k.replace(".base_layer", "") for k in kept if ".base_layer." in k} == renamed
    assert not hasattr(model.backbone, "peft_config")


@pytest.mark.parametrize("method", TUNERS)
def test_starts_as_the_pretrained_function_where_the_paper_does(method, tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    plain = copy.deepcopy(backbone).eval()
    model = create_method(method, backbone, num_classes=3).eval()
    with torch.no_grad():
        same = torch.allclose(model.backbone.forward_features(tiny_batch[0]), plain.forward_features(tiny_batch[0]),
                              atol=1e-5)
    assert same == (method != "fourierft") == model.identity_at_init  # FourierFT: N(0, 1) spectrum, peft's default


@pytest.mark.parametrize("method", TUNERS)
def test_every_added_tensor_moves_and_everything_else_stays_bit_identical(method, tiny_batch):
    model = tuner(method)
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    train_steps(model, tiny_batch)  # two steps: a factor behind a zero factor sees error only after the first
    after = dict([*model.named_parameters(), *model.named_buffers()])
    changed = {n for n, t in after.items() if not torch.equal(t, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", TUNERS)
def test_pretrained_modules_stay_in_eval_while_the_head_and_peft_layers_train(method):
    model = tuner(method).train()
    for layer in model.peft_layers().values():
        assert layer.training and not layer.base_layer.training
    assert model.backbone.head.training and not model.backbone.blocks[0].norm1.training
    assert all(not m.training for m in model.pretrained_modules)


def test_scale_vectors_are_exempt_from_weight_decay_like_norm_weights():
    ia3, boft, dora = tuner("ia3"), tuner("boft"), tuner("dora")
    assert {n for n, _ in ia3.named_parameters() if "ia3_l" in n} <= ia3.no_weight_decay()
    assert {n for n, _ in boft.named_parameters() if "boft_s" in n} <= boft.no_weight_decay()
    assert not any("boft_R" in n for n in boft.no_weight_decay())  # the rotations' Q decays towards identity
    assert dora.no_weight_decay() == create_method("linear", make_tiny_vit(), num_classes=3).no_weight_decay()


# --- each tuner's forward on one layer, against the formula of its paper (as peft parameterises it) -------------------
def perturbed_layer(method: str, name: str = "blocks.0.attn.qkv", **options):
    """A wrapped layer whose tensors all left their init (so no term of the formula is zero)."""
    model = tuner(method, **options)
    layer = model.peft_layers()[name]
    with torch.no_grad():
        for _, p in layer.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return layer


X = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))


def check(layer, expected, x=X):
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("rank", "alpha"), [(8, 16.0), (2, 5.0)])
def test_dora_is_magnitude_times_unit_direction_of_w_plus_scaled_b_a(rank, alpha):
    layer = perturbed_layer("dora", rank=rank, alpha=alpha)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    assert a.shape == (rank, 32) and bb.shape == (96, rank) and m.shape == (96,)
    direction = w + (alpha / rank) * bb @ a
    check(layer, X @ (m[:, None] * direction / direction.norm(dim=1, keepdim=True)).T + b)


def test_dora_magnitude_starts_at_the_row_norms_of_w():
    layer = tuner("dora").peft_layers()["blocks.1.attn.proj"]
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1))


def test_ia3_scales_the_qkv_output_and_the_fc2_input():
    qkv = perturbed_layer("ia3")
    w, b, scale = qkv.base_layer.weight, qkv.base_layer.bias, qkv.ia3_l["default"]
    assert scale.shape == (96, 1)
    check(qkv, (X @ w.T + b) * scale.flatten())
    fc2 = perturbed_layer("ia3", name="blocks.0.mlp.fc2")
    w, b, scale = fc2.base_layer.weight, fc2.base_layer.bias, fc2.ia3_l["default"]
    assert scale.shape == (1, 128)
    x = torch.randn(2, 5, 128)
    check(fc2, (x * scale.flatten()) @ w.T + b, x)


def test_ia3_vectors_start_at_one():
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in tuner("ia3").named_parameters() if "ia3_l" in n)


def test_loha_is_the_hadamard_product_of_two_low_rank_products():
    layer = perturbed_layer("loha", rank=4, alpha=6.0)
    w1a, w1b, w2a, w2b = (layer.get_parameter(f"hada_w{i}_{ab}.default") for i in (1, 2) for ab in "ab")
    assert w1a.shape == w2a.shape == (96, 4) and w1b.shape == w2b.shape == (4, 32)
    delta = (6.0 / 4) * (w1a @ w1b) * (w2a @ w2b)
    check(layer, X @ (layer.base_layer.weight + delta).T + layer.base_layer.bias)


def test_loha_and_lokr_start_from_a_zero_factor():
    loha = tuner("loha").peft_layers()["blocks.0.attn.qkv"]
    assert loha.hada_w2_b["default"].abs().sum() == 0 and loha.hada_w1_a["default"].abs().sum() > 0
    lokr = tuner("lokr").peft_layers()["blocks.0.attn.qkv"]
    assert lokr.lokr_w1["default"].abs().sum() == 0 and lokr.lokr_w2["default"].abs().sum() > 0


def test_lokr_is_a_kronecker_product_of_the_factored_shapes():
    layer = perturbed_layer("lokr", rank=8, alpha=4.0)
    w1, w2 = layer.lokr_w1["default"], layer.lokr_w2["default"]
    # out 96 = 8 * 12 and in 32 = 4 * 8, each factored as close to square as possible; r = 8 >= max(12, 8) / 2,
    # so W2 is a full (12, 8) matrix
    assert w1.shape == (8, 4) and w2.shape == (12, 8)
    delta = (4.0 / 8) * torch.kron(w1, w2)
    check(layer, X @ (layer.base_layer.weight + delta).T + layer.base_layer.bias)


def test_lokr_low_rank_second_factor_below_half_its_size():
    layer = perturbed_layer("lokr", rank=2, alpha=2.0)  # r = 2 < max(12, 8) / 2: W2 = W2a W2b of rank 2
    w1, w2a, w2b = layer.lokr_w1["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"]
    assert w2a.shape == (12, 2) and w2b.shape == (2, 8)
    check(layer, X @ (layer.base_layer.weight + torch.kron(w1, w2a @ w2b)).T + layer.base_layer.bias)


def test_vera_scales_shared_frozen_random_projections_by_trained_vectors():
    model = tuner("vera", rank=16, d_initial=0.1)
    layers = model.peft_layers()
    qkv, proj = layers["blocks.0.attn.qkv"], layers["blocks.0.attn.proj"]
    assert qkv.vera_A["default"] is proj.vera_A["default"] and not qkv.vera_A["default"].requires_grad  # shared
    assert torch.equal(qkv.vera_lambda_d["default"], torch.full((16,), 0.1))
    assert qkv.vera_lambda_b["default"].abs().sum() == 0  # b = 0: dW = 0 at the start
    with torch.no_grad():
        qkv.vera_lambda_b["default"].normal_()
        qkv.vera_lambda_d["default"].normal_()
    a, b = qkv.vera_A["default"][:, :32], qkv.vera_B["default"][:96, :]
    lb, ld = qkv.vera_lambda_b["default"], qkv.vera_lambda_d["default"]
    check(qkv, X @ qkv.base_layer.weight.T + qkv.base_layer.bias + lb * ((ld * (X @ a.T)) @ b.T))


def test_boft_rotates_the_input_by_cayley_blocks_and_scales_the_output():
    layer = perturbed_layer("boft", block_size=4)
    r, s = layer.boft_R["default"], layer.boft_s["default"]
    assert r.shape == (1, 8, 4, 4) and s.shape == (96, 1) and not layer.fbd_cuda_available
    skew = 0.5 * (r[0] - r[0].transpose(1, 2))
    eye = torch.eye(4)
    blocks = [(eye - q) @ torch.linalg.inv(eye + q) for q in skew]  # Cayley: orthogonal for skew q
    rotation = torch.block_diag(*blocks)  # (32, 32)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(32), atol=1e-5, rtol=0)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    check(layer, ((X @ rotation) @ w.T) * s.flatten() + b)


def test_boft_block_size_sets_the_rotation_blocks():
    layers = tuner("boft", block_size=8).peft_layers()
    assert layers["blocks.0.attn.qkv"].boft_R["default"].shape == (1, 32 // 8, 8, 8)
    assert layers["blocks.0.mlp.fc2"].boft_R["default"].shape == (1, 128 // 8, 8, 8)


def test_boft_starts_with_identity_rotations_and_unit_scales():
    layer = tuner("boft").peft_layers()["blocks.1.mlp.fc2"]
    assert layer.boft_R["default"].abs().sum() == 0 and torch.equal(layer.boft_s["default"], torch.ones(32, 1))


def test_fourierft_delta_is_the_scaled_real_inverse_dft_of_a_sparse_spectrum():
    layer = perturbed_layer("fourierft", n_frequency=50, scaling=3.0)
    spectrum = layer.fourierft_spectrum["default"]
    # n distinct entries of the (out, in) grid, drawn once from peft's fixed seed 777, row-major
    flat = torch.randperm(96 * 32, generator=torch.Generator().manual_seed(777))[:50]
    where = torch.stack([flat // 32, flat % 32])
    assert spectrum.shape == (50,) and torch.equal(layer.indices["default"], where)
    delta = torch.zeros(96, 32)
    rows, cols = torch.arange(96)[:, None], torch.arange(32)[None, :]
    # the real part of the inverse DFT, (1 / MN) sum_(u, v) c_uv exp(2 pi i (u row / M + v col / N)), by hand
    for value, i, j in zip(spectrum, where[0], where[1], strict=True):
        delta += value * torch.cos(2 * math.pi * (i * rows / 96 + j * cols / 32)) / (96 * 32)
    check(layer, X @ (layer.base_layer.weight + 3.0 * delta).T + layer.base_layer.bias)


def test_fourierft_may_learn_every_entry_of_the_smallest_weight():
    model = tuner("fourierft", n_frequency=32 * 32)  # proj's 1,024 entries: the largest n allowed
    assert model.peft_layers()["blocks.0.attn.proj"].fourierft_spectrum["default"].numel() == 1024


def test_fourierft_spectrum_starts_standard_normal():
    spectra = torch.cat([p.detach() for n, p in tuner("fourierft").named_parameters() if "spectrum" in n])
    assert spectra.numel() == 4 * 1000 and spectra.std().item() == pytest.approx(1.0, abs=0.05)


# --- evaluation never writes W ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dora", "boft"])
def test_evaluation_runs_unmerged_and_leaves_w_bit_identical(method, tmp_path):
    model = tuner(method)
    train_steps(model, (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(model, DataLoader(data, batch_size=4), verbose=False)
    assert not any(layer.merged for layer in model.peft_layers().values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --- peft's LoRA against methods/lora.py --------------------------------------------------------------------------
def test_peft_lora_computes_our_lora_bit_for_bit_but_renames_its_tensors(tiny_batch):
    """Why `lora` stays hand-written (docs/methods.md): same layers, counts, init and outputs; other names."""
    torch.manual_seed(0)
    backbone = make_tiny_vit()
    ours = create_method("lora", copy.deepcopy(backbone), num_classes=3, targets="qkv_proj", alpha=16.0).eval()
    theirs = copy.deepcopy(ours.backbone)
    for block in theirs.blocks:  # peft on the very Linears ours wraps
        for name in ("qkv", "proj"):
            mine = getattr(block.attn, name)
            linear = torch.nn.Linear(mine.in_features, mine.out_features)
            linear.weight, linear.bias = mine.weight, mine.bias
            setattr(block.attn, name, linear)
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, lora_alpha=16, target_modules=r"blocks\.\d+\.attn\.(qkv|proj)"),
                                 theirs)
    theirs.eval()
    mine = {n: m for n, m in ours.backbone.named_modules() if isinstance(m, LoRALinear)}
    peft_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert mine.keys() == peft_layers.keys()
    for name, layer in peft_layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)), as ours
        assert a.abs().max() <= bound and b.abs().sum() == 0 and layer.scaling == {"default": 2.0}
        with torch.no_grad():
            mine[name].lora_B.normal_()
            a.copy_(mine[name].lora_A)
            b.copy_(mine[name].lora_B)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == ours.tuned_params - (32 * 3 + 3)
    with torch.no_grad():
        assert torch.equal(theirs(tiny_batch[0]), ours(tiny_batch[0]))
    assert "blocks.0.attn.qkv.lora_A.default.weight" in theirs.state_dict()  # ours: blocks.0.attn.qkv.lora_A
    assert "blocks.0.attn.qkv.base_layer.weight" in theirs.state_dict()  # ours: blocks.0.attn.qkv.weight


# --- options ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "options", "message"), [
    ("dora", {"rank": 0}, r"DoRA rank must be a positive integer \(e.g. rank=8\), got 0"),
    ("dora", {"alpha": -1.0}, "DoRA alpha must be a positive number"),
    ("ia3", {"rank": 8}, "has no option"),
    ("loha", {"rank": 2.5}, "LoHa rank must be a positive integer"),
    ("loha", {"alpha": float("inf")}, "LoHa alpha must be a positive number"),
    ("lokr", {"rank": True}, "LoKr rank must be a positive integer"),
    ("vera", {"rank": 0}, "VeRA rank must be a positive integer"),
    ("vera", {"d_initial": 0}, "VeRA d_initial must be a positive number"),
    ("boft", {"block_size": 0}, "BOFT block_size must be a positive integer"),
    ("boft", {"block_size": 3}, r"BOFT block_size 3 does not divide the adapted input widths \[32, 128\]; "
                                r"choose one of \[1, 2, 4, 8, 16, 32\]"),
    ("boft", {"block_size": 64}, r"BOFT block_size 64 does not divide the adapted input widths \[32, 128\]"),
    ("fourierft", {"n_frequency": 0}, "FourierFT n_frequency must be a positive integer"),
    ("fourierft", {"n_frequency": 1025}, "at most the smallest adapted weight's 1,024 entries, got 1025"),
    ("fourierft", {"scaling": "big"}, "FourierFT scaling must be a positive number"),
])
def test_bad_options_name_the_problem(method, options, message):
    with pytest.raises(ValueError, match=message):
        create_method(method, make_tiny_vit(), num_classes=3, **options)


def test_non_linear_targets_are_refused():
    backbone = make_tiny_vit()
    backbone.blocks[0].attn.qkv = torch.nn.Identity()
    with pytest.raises(ValueError, match="DoRA adapts nn.Linear layers; this backbone's blocks.0.attn.qkv is Identity"):
        create_method("dora", backbone, num_classes=3)

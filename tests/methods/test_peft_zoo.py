"""Every peft tuner through methods/peft_table.py and methods/peft_zoo.py: the ViT-B/16 counts at 200 classes by
formula, the table's facts (names, colours, families, merging) against what peft builds, `peft:<type>` naming and
refusals, options generated from peft's config fields, AdaLoRA's schedule under a real Trainer, and peft's own
layers against the wrapped model's forward on the same weights. The zoo contract (test_zoo_contract.py) runs
every row's method on the tiny backbones."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import fields

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from backbones import create_backbone
from methods import create_method, get_method_class, list_methods
from methods.peft_table import TUNERS, UNSUPPORTED, options_class, row_for
from methods.registry import color
from tests.helpers.models import TINY_METHOD_OPTIONS, TINY_VIT, make_tiny, make_tiny_convnet
from tests.helpers.training import train_steps

D, C, DEPTH = 768, 200, 12
HEAD = D * C + C
QKV, PROJ, FC1, FC2 = (D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)  # (in, out) of ViT-B/16's block linears
ATTN, ALL = (QKV, PROJ), (QKV, PROJ, FC1, FC2)


def per_layer(count, layers=ATTN) -> int:
    """DEPTH blocks of `count(fan_in, fan_out)` summed over the adapted layers."""
    return DEPTH * sum(count(i, o) for i, o in layers)


# Each from its tuner's parameterisation (peft 0.22.0 defaults, this suite's layers), then the head.
VIT_B_COUNTS = {
    "peft_lora": per_layer(lambda i, o: 8 * (i + o)),  # A (8, in), B (out, 8)
    "adalora": per_layer(lambda i, o: 12 * (i + o) + 12, ALL),  # P, Q at init_r 12 and the 12 singular values
    "beft": per_layer(lambda i, o: o),  # one bias vector per output
    "c3a": per_layer(lambda i, o: (o // 256) * (i // 256) * 256),  # a 256-long circulant kernel per block pair
    "deft": per_layer(lambda i, o: 8 * (i + o)),  # P (out, 8), R (8, in)
    "delora": per_layer(lambda i, o: 8 * (i + o) + 1),  # A, B and the norm bound lambda
    # GLoRA: A and B (out, 8) (8, in) each, C (in, 8) (8, 1), D and E scalars
    "glora": per_layer(lambda i, o: 2 * 8 * (o + i) + 8 * i + 8 + 2),
    "gralora": per_layer(lambda i, o: 32 * (i + o)),  # k x k sub-blocks of rank 32 / k: rank-32 parameters
    "hira": per_layer(lambda i, o: 32 * (i + o)),  # A (32, in), B (out, 32), Hadamard with W
    "hra": per_layer(lambda i, o: 8 * i),  # 8 Householder vectors over the input
    # Lily: a rank-32 A (and a 2-way router) per layer, two B experts (32, out) per layer kind, shared by the blocks
    "lily": per_layer(lambda i, o: 32 * i + 2 * 32) + sum(2 * 32 * o for _, o in ATTN),
    "ln_tuning": DEPTH * 4 * D,  # weight and bias of both norms
    "miss": per_layer(lambda i, o: 64 * o),  # a (64, out) shard matrix
    "oft": per_layer(lambda i, o: (i // 32) * (32 * 31 // 2), ALL),  # skew-symmetric 32 x 32 blocks over the input
    "osf": per_layer(lambda i, o: (o + 1 + i) * (min(i, o) // 2)),  # U, S, V of the lower half of the spectrum
    "peanut": per_layer(lambda i, o: 2 * 32 * o),  # depth 0: a (32, out) and an (out, 32) map of W's output
    "psoft": per_layer(lambda i, o: 32 * 31 // 2 + 2 * 32),  # a 32 x 32 skew-symmetric R and two scale vectors
    # RandLoRA: min(in, out) / 32 random bases, each with a (32,) lambda and an (in,) gamma row
    "randlora": per_layer(lambda i, o: (min(i, o) // 32) * (32 + i)),
    "road": per_layer(lambda i, o: o),  # an angle and a scale per output pair
    "shira": per_layer(lambda i, o: 32 * (i + o)),  # as many sparse entries as a rank-32 LoRA
    "supertuning": per_layer(lambda i, o: i * o // 100),  # 1% of W's entries (sparsity 0.99)
    "waveft": per_layer(lambda i, o: 2592),  # wavelet coefficients per layer
    "pvera": per_layer(lambda i, o: o + 2 * 256),  # b (out) and d's mean and spread (2 x 256)
    # VB-LoRA: one 256 x 256 vector bank; per layer top-k logits for rank-4 A and B sub-vectors of length 256
    "vblora": 256 * 256 + per_layer(lambda i, o: 4 * (i // 256) * 256 + (o // 256) * 4 * 256),
    "unilora": 256,  # one shared theta_d of length 256 for every layer
    "tinylora": DEPTH * 2 * 64,  # a 64-long vector per adapted layer (weight_tying 0)
    "paca": per_layer(lambda i, o: 8 * o),  # the update of r = 8 of W's input columns (out, 8), no added matrices
}


def adamss(i: int, o: int, r: int = 100, num_subspaces: int = 5) -> int:
    """AdaMSS at subspace_rank 1 (peft's default): an SVD of [W | b] (out, in + 1) at rank min(r, out, in + 1), its
    left singular vectors' out rows k-means-clustered into num_subspaces subspaces; per subspace an A (1, rank) and a
    B (rows in the subspace, 1), so the Bs cover the out rows once."""
    return num_subspaces * min(r, o, i + 1) + o


def frod(i: int, o: int, sparse_rate: float = 0.01) -> int:
    """FRoD: per layer a lambda (in,) over the shared (in, in) basis V of its layer kind, and the values of a sparse
    (in, in) S with int(in * in * sparse_rate) off-diagonal entries (the positions are a seeded draw, shared)."""
    return i + int(i * i * sparse_rate)


# Their init reads W (SVDs, k-means, a joint decomposition): ~1 min each for ViT-B on 2 CPU cores, so slow. The counts
# do not depend on W's values at these defaults: AdaMSS's k-means yields num_subspaces non-empty clusters for distinct
# rows and a rank-1 A and B per cluster, whatever the cluster sizes; FRoD's shapes are in alone. (AdaMSS with
# subspace_rank k > 1 counts sum over clusters of min(n_c, k) * (n_c + rank), n_c the cluster sizes k-means draws
# from W; with use_dynamic_rank the ranks follow W's singular values: neither is pinned.)
SLOW_COUNTS = {"adamss": per_layer(adamss), "frod": per_layer(frod)}
ROWS = [name for name in TUNERS if name not in ("dora", "ia3", "loha", "lokr", "vera", "boft", "fourierft")]


@pytest.fixture(scope="module")
def meta_vit_b():
    with torch.device("meta"):
        return create_backbone("vit_base_patch16_224", pretrained=False, weight_init="skip")


def test_vit_b_counts_match_the_formulas(meta_vit_b):
    counted = {}
    for name in VIT_B_COUNTS:
        with torch.device("meta"):
            counted[name] = create_method(name, copy.deepcopy(meta_vit_b), C).tuned_params
    assert counted == {name: count + HEAD for name, count in VIT_B_COUNTS.items()}
    assert set(VIT_B_COUNTS) | set(SLOW_COUNTS) == set(ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_COUNTS)
def test_vit_b_counts_of_the_tuners_that_read_the_weights(meta_vit_b, name):
    with torch.device("meta"):
        model = create_method(name, copy.deepcopy(meta_vit_b), C)
    assert model.tuned_params == SLOW_COUNTS[name] + HEAD


@pytest.mark.parametrize("name, options, layer_count", [
    ("adamss", {}, adamss),
    ("adamss", {"r": 20, "num_subspaces": 3}, lambda i, o: adamss(i, o, r=20, num_subspaces=3)),
    ("frod", {}, frod),
    ("frod", {"sparse_rate": 0.05}, lambda i, o: frod(i, o, sparse_rate=0.05)),
])
def test_the_weight_reading_tuners_count_by_their_formulas_on_the_tiny_vit(name, options, layer_count):
    """The slow ViT-B formulas on the tiny ViT (width 32, 2 blocks, real random weights), options included: AdaMSS's
    rank is min(r, out, in + 1) (33 for qkv at r = 100, 20 at r = 20), FRoD's sparse S int(32 * 32 * rate) entries."""
    d, depth, classes = TINY_VIT["embed_dim"], TINY_VIT["depth"], 3
    model = create_method(name, make_tiny("vit"), classes, **options)
    assert model.tuned_params == depth * (layer_count(d, 3 * d) + layer_count(d, d)) + d * classes + classes


def test_the_table_registers_at_least_thirty_peft_methods_with_distinct_colours():
    peft_methods = [m for m in list_methods() if m in TUNERS]
    assert len(peft_methods) == len(TUNERS) >= 30
    ours = [color(m) for m in TUNERS]
    others = {color(m) for m in list_methods() if m not in TUNERS}
    assert len(set(ours)) == len(ours) and not set(ours) & others
    for name, row in TUNERS.items():
        cls = get_method_class(name)
        assert (cls.label, cls.families, cls.identity_at_init, cls.tuner) == (row.label, row.families, row.identity,
                                                                               row)


@pytest.mark.parametrize("peft_type, name", [("hra", "hra"), ("OFT", "oft"), ("lora", "peft_lora"), ("vera", "vera"),
                                             ("ln_tuning", "ln_tuning")])
def test_peft_type_names_its_registered_method(peft_type, name):
    assert get_method_class(f"peft:{peft_type}") is get_method_class(name)


@pytest.mark.parametrize("name, expected", [
    ("peft:hrq", f"Unknown peft type 'hrq' (peft {peft.__version__}). Did you mean 'hra'?"),
    ("peft:prefix_tuning", "peft type 'prefix_tuning' cannot tune a vision backbone: a prompt-learning type"),
    ("peft:poly", "peft type 'poly' cannot tune a vision backbone: it mixes LoRA skills by a task id"),
])
def test_unknown_and_language_model_types_are_refused_with_the_fix(name, expected):
    with pytest.raises(ValueError) as err:
        get_method_class(name)
    assert str(err.value).startswith(expected)


def test_every_peft_type_is_a_row_or_refused_with_a_reason():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    types = {t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    rows = {row.peft_type for row in TUNERS.values()}
    assert types == rows | set(UNSUPPORTED) and not rows & set(UNSUPPORTED)


def test_a_type_without_a_row_is_built_from_the_default_row(monkeypatch):
    """A newer peft's tuner: no row, yet `peft:<type>` adapts the attention linears with peft's defaults."""
    from methods import peft_table, peft_zoo

    monkeypatch.delitem(peft_table.BY_TYPE, "hra")
    peft_zoo.unregistered.cache_clear()
    cls = get_method_class("peft:hra")
    assert cls is not get_method_class("hra") and cls.method_name == "peft:hra" and cls.families == ("vit", "swin")
    model = create_method("peft:hra", make_tiny("vit"), num_classes=3)
    assert set(model.peft_layers()) == {f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")}
    peft_zoo.unregistered.cache_clear()


# --- options: peft's config fields, checked by type ---------------------------------------------------------------
def test_options_are_the_config_fields_with_peft_defaults_or_the_rows():
    hra = options_class(TUNERS["hra"])()
    assert (hra.r, hra.apply_GS, hra.init_weights) == (8, False, True)  # peft's HRAConfig defaults
    assert not hasattr(hra, "target_modules") and not hasattr(hra, "layers_to_transform")  # the suite's
    adalora = options_class(TUNERS["adalora"])()  # its schedule's length comes from the trainer, not from METHOD_ARGS
    assert not hasattr(adalora, "total_step") and not hasattr(hra, "fan_in_fan_out")
    assert options_class(TUNERS["frod"])().progressbar is False  # the row's
    assert options_class(TUNERS["c3a"])().block_size is None  # decided from the widths


@pytest.mark.parametrize("options, expected", [
    ({"r": 2.5}, "HRA r must be a positive integer, got 2.5"),
    ({"r": 0}, "HRA r must be a positive integer, got 0"),
    ({"apply_GS": "yes"}, "HRA apply_GS must be true or false"),
])
def test_bad_option_values_are_refused_in_one_line(options, expected):
    with pytest.raises(ValueError, match=expected) as err:
        options_class(TUNERS["hra"])(**options)
    assert "\n" not in str(err.value)


# (row, field): (accepted, refused), by hand from peft's docs and checks: ranks and counts from 1, dropouts in [0, 1),
# fractions in [0, 1], seeds from 0, scales above 0, LoKr's -1 (peft picks the factor), two B experts at least (Lily),
# an even group size from 2 (RoAd), PSOFT's eps in (0, 1), the bias modes each help lists, no LoftQ (needs its config).
BY_HAND = {
    ("peft_lora", "r"): ([1, 64], [0, -1, 1.5, True]),
    ("peft_lora", "lora_dropout"): ([0, 0.5], [1, 1.0, -0.1]),
    ("peft_lora", "lora_alpha"): ([1, 16], [0, -8]),
    ("peft_lora", "init_lora_weights"): ([True, False, "gaussian", "pissa"], ["loftq", 1, 0]),
    ("adalora", "tinit"): ([0, 10], [-1]),
    ("adalora", "beta1"): ([0, 0.85], [1, 1.0, -0.1]),
    ("frod", "sparse_rate"): ([0, 0.01, 1], [1.01, -0.01]),
    ("frod", "projection_prng_key"): ([0, 7], [-1]),
    ("lily", "num_B"): ([2, 4], [1, 0]),
    ("road", "group_size"): ([2, 64], [1, 0]),
    ("psoft", "cayley_neumann_eps"): ([None, 0.5], [0, 1, 1.0]),
    ("waveft", "scaling"): ([0.5, 25], [0, -25.0]),
    ("waveft", "wavelet_family"): (["db1", "sym2"], ["haar2", "a.pth"]),
    ("unilora", "bias"): (["none", "all", "unilora_only"], ["lora_only", "x"]),
    ("unilora", "init_theta_d_bound"): ([0.02], [0, 0.0, -0.02]),
    ("oft", "r"): ([0], [-1]),
    ("tinylora", "weight_tying"): ([0, 0.5, 1], [1.5, -0.5]),
    ("hira", "init_weights"): ([True, False], [1, 0]),
}


@pytest.mark.parametrize(("method", "name"), list(BY_HAND))
def test_the_generated_ranges_written_by_hand(method, name):
    cls = get_method_class(method).options_cls
    accepted, refused = BY_HAND[method, name]
    for value in accepted:
        assert getattr(cls(**{name: value}), name) == value
    for value in refused:
        message = f"^{re.escape(cls.method)} {name} must be .*, got {re.escape(repr(value))}\\.$"
        with pytest.raises(ValueError, match=message):
            cls(**{name: value})


def test_every_numeric_field_of_a_row_has_a_known_range():
    """The fallback (at least 0) is for a newer peft's fields only: each row's numbers are in the range tables."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from methods.peft_table import PEFT_TYPES, field_range
    for row in TUNERS.values():
        numeric = [f.name for f in fields(options_class(row)) if f.metadata["rule"].kind in (int, float)]
        config = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPES[row.peft_type]]
        assert {f.name for f in fields(config)} >= set(numeric), row.name
        assert [n for n in numeric if field_range(row.peft_type, n) is None] == [], row.name


def test_float_fields_take_integers_as_numbers_and_choices_are_checked():
    options = options_class(TUNERS["glora"])(config_A_B="vector")
    assert options.values()["config_A_B"] == "vector"
    with pytest.raises(ValueError, match="config_A_B must be one of lora, vector, constant, none"):
        options_class(TUNERS["glora"])(config_A_B="matrix")
    assert options_class(TUNERS["waveft"])(scaling=25).values()["scaling"] == 25.0
    assert isinstance(options_class(TUNERS["waveft"])(scaling=25).values()["scaling"], float)


def test_c3a_block_size_divides_every_adapted_width():
    vit = create_method("c3a", make_tiny("vit"), num_classes=3)  # widths 32 and 96: peft's 256 would not divide
    assert {layer.block_size["default"] for layer in vit.peft_layers().values()} == {32}
    swin = create_method("c3a", make_tiny("swin"), num_classes=3)  # gcd(256, 24, 48, 72, 144) = 8
    assert {layer.block_size["default"] for layer in swin.peft_layers().values()} == {8}


@pytest.mark.parametrize(("make", "widths"), [
    (lambda: make_tiny("vit"), (32, 96)),  # qkv 32 -> 96, proj 32 -> 32
    (lambda: create_backbone("vit_embedded_p7_28"), (128, 384)),  # the embedded default: width 128
    (lambda: create_backbone("vit_base_patch16_224", pretrained=False, depth=1), (768, 2304)),  # ViT-B/16's widths
])
def test_vblora_vector_length_divides_every_adapted_width(make, widths):
    expected = math.gcd(256, *widths)  # peft's 256 where it divides: 256 on ViT-B, 128 embedded, 32 tiny
    model = create_method("vblora", make(), num_classes=3)
    assert model.peft_model.peft_config["default"].vector_length == expected
    assert all(w % expected == 0 for w in widths)
    assert create_method("vblora", make(), num_classes=3, vector_length=16).peft_model.peft_config[
        "default"].vector_length == 16  # a chosen length is kept


# --- families: convolutions where the row says so ------------------------------------------------------------------
def test_conv_tuners_adapt_every_ungrouped_convolution_of_a_resnet():
    model = create_method("hra", make_tiny_convnet("resnet"), num_classes=3)
    blocks = [f"layer{i}.0" for i in range(1, 5)]
    expected = {f"{b}.conv{j}" for b in blocks for j in (1, 2)} | {f"{b}.downsample.0" for b in blocks}
    assert set(model.peft_layers()) == expected
    # the config asked for after injection (a run's peft-format save) names the same layers, not their base_layer
    assert set(model.peft_config().target_modules) == expected


def test_convnext_gets_its_block_linears_not_its_depthwise_convolution():
    expected = {f"stages.{s}.blocks.0.mlp.fc{j}" for s in range(4) for j in (1, 2)}
    model = create_method("hira", make_tiny_convnet("convnext"), num_classes=3)
    assert set(model.peft_layers()) == expected  # the tiny ConvNeXt's MLP: 1x1 Conv2d (timm's conv_mlp=True)
    # timm's channels-last MLP (conv_mlp=False, as convnext_base has it): the same layers as nn.Linear
    model = create_method("hira", make_tiny_convnet("convnext", conv_mlp=False), num_classes=3)
    assert {type(model.backbone.get_submodule(f"{name}.base_layer")) for name in expected} == {torch.nn.Linear}
    assert set(model.peft_layers()) == expected


def test_a_linear_only_tuner_refuses_a_resnet_naming_the_families():
    with pytest.raises(ValueError, match="Method 'oft' does not support convnet backbones .* it supports: vit, swin"):
        create_method("oft", make_tiny_convnet("resnet"), num_classes=3)


# --- merging: where the row says peft folds the update into W, the merged model computes the same function ---------
MERGING = [name for name in ROWS if TUNERS[name].merges]


@pytest.mark.parametrize("name", MERGING)
def test_merging_tuners_fold_into_w_with_the_same_outputs(name, tiny_batch):
    torch.manual_seed(0)
    model = create_method(name, make_tiny("vit"), num_classes=3, **TINY_METHOD_OPTIONS.get((name, "vit"), {}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    merged = copy.deepcopy(model)
    for layer in merged.peft_layers().values():
        layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(tiny_batch[0]), model(tiny_batch[0]), rtol=1e-4, atol=1e-4)


# --- peft's own layers against the wrapped model's forward, same weights ------------------------------------------
@pytest.mark.parametrize("name, config", [
    ("hra", lambda targets: peft.HRAConfig(target_modules=targets)),
    ("road", lambda targets: peft.RoadConfig(target_modules=targets, group_size=8)),
])
def test_the_method_computes_what_peft_computes_on_the_same_weights(name, config, tiny_batch):
    torch.manual_seed(0)
    backbone = make_tiny("vit")
    reference = copy.deepcopy(backbone)
    model = create_method(name, backbone, num_classes=3, **TINY_METHOD_OPTIONS.get((name, "vit"), {})).eval()
    reference.reset_classifier(3)
    wrapped = peft.get_peft_model(reference, config(r"blocks\.\d+\.attn\.(?:qkv|proj)")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    missing, unexpected = wrapped.base_model.model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "default" in k]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(tiny_batch[0]), model(tiny_batch[0]), rtol=1e-5, atol=1e-5)


# --- AdaLoRA: the budget schedule follows the trainer -------------------------------------------------------------
def test_adalora_schedule_spans_the_trainers_steps_and_allocates_every_step(tiny_batch, monkeypatch):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from methods.base import OptimConfig

    torch.manual_seed(0)
    model = create_method("adalora", make_tiny("vit"), num_classes=3, optim=OptimConfig(max_epochs=2),
                          tinit=1, tfinal=1)
    steps = []
    allocate = model.peft_model.update_and_allocate
    monkeypatch.setattr(model.peft_model, "update_and_allocate", lambda step: (steps.append(step), allocate(step)))
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=2)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    assert model.peft_model.peft_config["default"].total_step == 8  # 2 epochs x 4 batches
    assert steps == list(range(8))  # once after every optimizer step, with its 0-based index
    ranks = [int((layer.lora_E["default"] != 0).sum()) for layer in model.peft_layers().values()]
    assert sum(ranks) <= 8 * len(ranks)  # the final budget: target_r 8 per layer on average (init_r 12)


def test_adalora_adds_the_orthogonality_penalty_to_the_training_loss_only(tiny_batch):
    torch.manual_seed(0)
    model = create_method("adalora", make_tiny("vit"), num_classes=3)
    penalties = []
    for name, p in model.backbone.named_parameters():
        if ".lora_A." in name:
            penalties.append(torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0])))
        elif ".lora_B." in name:
            penalties.append(torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1])))
    expected = 0.5 * torch.stack(penalties).mean()  # peft's orth_reg_weight 0.5
    model.eval()
    plain_loss = model.model_step(tiny_batch)[0]
    model.train()
    torch.testing.assert_close(model.model_step(tiny_batch)[0] - plain_loss, expected, rtol=1e-4, atol=1e-5)


def test_shared_state_tuners_keep_one_bank_for_every_layer():
    model = create_method("vblora", make_tiny("vit"), num_classes=3, **TINY_METHOD_OPTIONS[("vblora", "vit")])
    banks = {id(layer.vblora_vector_bank["default"]) for layer in model.peft_layers().values()}
    assert len(banks) == 1


def test_peft_layers_are_the_only_wrapped_modules_and_train_with_the_head(tiny_batch):
    model = create_method("hra", make_tiny("vit"), num_classes=3)
    assert all(isinstance(m, BaseTunerLayer) for m in model.peft_layers().values())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"backbone.blocks.{i}.attn.{n}.hra_u.default" for i in range(2) for n in ("qkv", "proj")} | {
        "backbone.head.weight", "backbone.head.bias"}
    train_steps(model, tiny_batch)


def test_default_row_of_a_type_names_it():
    row = row_for("somenewtype")
    assert (row.name, row.layers, row.families, row.conv) == ("peft_somenewtype", "attention", ("vit", "swin"), False)


def test_docs_show_the_generated_peft_table():
    from pathlib import Path

    from benchmark.params import peft_markdown

    text = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    shown = text.split("<!-- peft-table:start -->\n")[1].split("<!-- peft-table:end -->")[0]
    assert shown == peft_markdown(), "regenerate it: python -m benchmark.params --peft-table"

"""benchmark.perf measures what it says: FLOPs including fused attention, a full row per method with evaluation
under inference mode, rows merged by configuration, bad input named. No speed thresholds here: the targets are
benchmarks (docs/performance.md)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from benchmark import perf
from benchmark.costs.model_costs import PerfConfig, build_model, matmul_peak_gflops, measure_method, training_flops
from benchmark.perf import merge_rows
from methods import create_method, list_methods
from tests.helpers.models import TINY_VIT, make_tiny_vit, tiny_options

REQUIRED = ["method", "backbone", "batch_size", "train_img_s", "eval_img_s", "peak_mem_mb", "flops_per_img",
            "achieved_gflops"]


def fused_off(model):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def test_flops_count_fused_attention_like_explicit_matmuls(tiny_batch):
    """timm's fused (SDPA) path on CPU is counted: forward FLOPs equal the explicit q@k, attn@v path, and the
    backward adds exactly the score recomputation the fused kernel does (one q@k^T per block)."""
    images, labels = tiny_batch
    linear = create_method("linear", make_tiny_vit(), num_classes=3)
    assert training_flops(linear, tiny_batch) == training_flops(fused_off(linear), tiny_batch)
    torch.manual_seed(0)
    full = create_method("full", make_tiny_vit(), num_classes=3)
    fused, explicit = training_flops(full, tiny_batch), training_flops(fused_off(full), tiny_batch)
    b, heads, tokens = len(images), TINY_VIT["num_heads"], (TINY_VIT["img_size"] // TINY_VIT["patch_size"]) ** 2 + 1
    head_dim = TINY_VIT["embed_dim"] // heads
    assert fused - explicit == TINY_VIT["depth"] * 2 * b * heads * tokens * tokens * head_dim
    assert all(p.grad is None for p in full.parameters())  # counting leaves no gradients behind


def test_frozen_parts_cost_no_weight_gradient_flops(tiny_batch):
    """Full fine-tuning computes weight gradients that VPT-deep and the linear probe skip."""
    flops = {m: training_flops(create_method(m, make_tiny_vit(), num_classes=3, **opts), tiny_batch)
             for m, opts in [("full", {}), ("vpt_deep", {"prompt_length": 1}), ("linear", {})]}
    assert flops["linear"] < flops["vpt_deep"] < flops["full"]


@pytest.mark.parametrize("method", ["linear", "vpt_deep"])
def test_measure_method_row(method):
    cfg = PerfConfig(method=method, backbone="vit_embedded_p7_28", batch_size=4, num_classes=5, steps=2, warmup=1,
                     method_options={"prompt_length": 3} if method == "vpt_deep" else {})
    row = measure_method(cfg)
    assert all(key in row for key in REQUIRED)
    assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["flops_per_img"] > 0
    assert row["peak_mem_mb"] > 0 and row["timed_steps"] == 2 and row["img_size"] == 28
    assert row["eval_inference_mode"] is True
    assert row["fused_attn"] is True  # timm's fused attention stays on, VPT included
    assert math.isclose(row["achieved_gflops"], row["flops_per_img"] * row["train_img_s"] / 1e9)


def test_measure_method_with_bf16_autocast_and_checkpointing():
    cfg = PerfConfig(method="vpt_deep", backbone="vit_embedded_p7_28", batch_size=4, num_classes=5, steps=1,
                     warmup=1, precision="bf16-mixed", checkpointing=True, method_options={"prompt_length": 2})
    row = measure_method(cfg)
    assert row["precision"] == "bf16-mixed" and row["checkpointing"] is True and row["train_img_s"] > 0


def test_merge_rows_replaces_same_configuration(tmp_path):
    path = tmp_path / "perf.csv"
    base = {k: 0 for k in perf.KEY_COLUMNS} | {"method_options": "{}", "train_img_s": 1.0}
    merge_rows(path, pd.DataFrame([base | {"method": "full"}, base | {"method": "linear"}]))
    merge_rows(path, pd.DataFrame([base | {"method": "full", "train_img_s": 2.0},
                                   base | {"method": "full", "batch_size": 8, "train_img_s": 3.0}]))
    table = pd.read_csv(path)
    assert len(table) == 3
    assert sorted(table["train_img_s"]) == [1.0, 2.0, 3.0]


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops(torch.device("cpu"), sizes=(64,), repeats=2) > 0


def test_unknown_method_is_named():
    with pytest.raises(SystemExit, match="unknown method.*'vpt-deep'.*METHODS takes"):
        perf.main(["--methods", "full,vpt-deep"])


def test_bad_step_counts_rejected():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        PerfConfig(steps=0)


@pytest.mark.slow
def test_cli_writes_csv_and_figure(tmp_path):
    out = tmp_path / "perf.csv"
    assert perf.main(["--methods", "full,vpt_deep", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                      "--out", str(out), "--figures", str(tmp_path / "figures")]) == 0
    table = pd.read_csv(out)
    assert list(table["method"]) == ["full", "vpt_deep"]
    assert table["pct_of_peak"].gt(0).all() and table["loader_img_s"].gt(0).all()
    assert table.loc[table["method"] == "full", "step_vs_full"].item() == 1.0
    assert (tmp_path / "figures" / "perf_vit_embedded_p7_28_bs4.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "vpt_deep"])
def test_compiled_model_matches_eager(method, tiny_batch):
    """COMPILE=1 changes speed only; the linear probe's frozen pass stays gradient-free inside the graph."""
    from benchmark.core.pipeline import apply_speed_options

    torch.manual_seed(0)
    eager = create_method(method, make_tiny_vit(), num_classes=3).eval()
    torch.manual_seed(0)
    compiled = create_method(method, make_tiny_vit(), num_classes=3).eval()
    apply_speed_options(compiled, compile=True, checkpointing=False)
    torch.testing.assert_close(compiled(tiny_batch[0]), eager(tiny_batch[0]), rtol=1e-4, atol=1e-5)
    torch.nn.functional.cross_entropy(compiled.train()(tiny_batch[0]), tiny_batch[1]).backward()
    assert all((p.grad is not None) == p.requires_grad for p in compiled.parameters())


@pytest.mark.parametrize("method", ["vpt_deep", "adapter", "linear"])
def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(method, tiny_batch):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = create_method(method, make_tiny_vit(), num_classes=3)
    trainer = L.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(*tiny_batch), batch_size=2))
    state = trainer.optimizers[0].state
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param in state, f"{name} trains but has no optimizer state"
        else:
            assert param.grad is None and param not in state, f"frozen {name} got a gradient or optimizer state"


@pytest.mark.parametrize("method", list_methods())
def test_fused_attention_stays_on(method, tiny_batch):
    """Every method keeps timm's scaled-dot-product attention, and a training step actually runs it."""
    from torch.profiler import profile

    model = create_method(method, make_tiny_vit(), num_classes=3, **tiny_options(method))
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)
    with profile() as prof:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(tiny_batch[0]), tiny_batch[1])
        loss.backward()
    assert any("scaled_dot_product" in event.key for event in prof.key_averages())


def test_repeats_reduce_to_per_method_medians():
    rows = pd.DataFrame({"method": ["full", "vpt_deep"] * 3, "batch_size": [8] * 6,
                         "train_step_ms": [10.0, 6.0, 30.0, 7.0, 11.0, 20.0], "fused_attn": [True] * 6})
    frame = perf.median_over_repeats(rows)
    assert list(frame["method"]) == ["full", "vpt_deep"]
    assert list(frame["train_step_ms"]) == [11.0, 7.0]
    assert list(frame["batch_size"]) == [8, 8] and frame["batch_size"].dtype.kind == "i"


def test_cache_speedups_are_ratios_of_medians_per_fraction():
    modes = ["no cache", "cache, cold", "cache, warm"]
    runs = pd.DataFrame({"train_fraction": [0.1] * 9 + [1.0] * 3, "mode": modes * 4, "epochs": 100, "n_train": 9,
                         "repeat": [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 0, 0],
                         "run_s": [20.0, 2.0, 1.0, 30.0, 4.0, 2.0, 10.0, 3.0, 1.5, 60.0, 3.0, 2.0],
                         "process_s": [27.0, 9.0, 8.0] * 4, "test_top1": 50.0, "val_top1": 50.0})
    frame = perf.cache_speedups(runs).set_index(["train_fraction", "mode"])
    assert frame.loc[(0.1, "no cache"), "run_s"] == 20.0 and frame.loc[(0.1, "no cache"), "repeats"] == 3
    assert frame.loc[(0.1, "cache, warm"), "speedup_run_s"] == pytest.approx(20.0 / 1.5)
    assert (frame.loc[(0.1, "cache, cold"), "run_s_min"], frame.loc[(0.1, "cache, cold"), "run_s_max"]) == (2.0, 4.0)
    assert frame.loc[(1.0, "cache, cold"), "speedup_run_s"] == pytest.approx(20.0)  # its own fraction's baseline
    assert frame.loc[(1.0, "no cache"), "speedup_process_s"] == 1.0


def plain_blocks(model):
    """The same model with timm's own Block forward (prompt outputs computed, then discarded)."""
    from timm.models.vision_transformer import Block

    for block in model.backbone.blocks:
        block.__class__ = Block
    return model


@pytest.mark.parametrize("prompt_dropout", [None, 0.0])
@pytest.mark.parametrize("vit", [{}, {"reg_tokens": 2, "qkv_bias": False}, {"qk_norm": True, "init_values": 0.1}])
def test_vpt_deep_prompt_rows_as_keys_values_only_is_the_same_function(vit, prompt_dropout, tiny_batch):
    """VPT-deep skips the queries/projection/MLP of prompt rows whose outputs are discarded: same logits and
    gradients as plain timm blocks (train mode: drop-path on; per-image prompt dropout 0.1 by default, or none,
    where the batch shares its prompts and they are projected once), fewer FLOPs."""
    from methods.vpt import KeyValuePromptBlock

    def step(model):
        torch.manual_seed(1)
        logits = model.train()(tiny_batch[0])
        torch.nn.functional.cross_entropy(logits, tiny_batch[1]).backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(create_method("vpt_deep", make_tiny_vit(drop_path_rate=0.2, **vit), num_classes=3,
                                    prompt_length=5, prompt_dropout=prompt_dropout))
    fast, plain = models[0], plain_blocks(models[1])
    assert all(isinstance(b, KeyValuePromptBlock) for b in fast.backbone.blocks)
    fast_logits, fast_grads = step(fast)
    plain_logits, plain_grads = step(plain)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert training_flops(fast, tiny_batch) < training_flops(plain, tiny_batch)
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_vpt_deep_shares_prompts_across_the_batch_only_without_dropout(tiny_batch):
    """The VPT code draws a dropout mask per image (expand, then drop out); with dropout off (eval, or rate 0)
    the batch shares one (1, p, D) prompt set, projected to keys/values once: fewer FLOPs, the same logits."""
    torch.manual_seed(0)
    model = create_method("vpt_deep", make_tiny_vit(), num_classes=3, prompt_length=5)
    masked = model.train().prompts_for(0, batch=4)
    assert masked.shape == (4, 5, 32) and not torch.equal(masked[0], masked[1])  # a mask per image
    assert model.eval().prompts_for(0, batch=4).shape == (1, 5, 32)
    shared_flops = training_flops(model, tiny_batch)  # eval mode: shared prompts

    per_image = model.prompts_for

    def expanded(layer, batch):
        return per_image(layer, batch).expand(batch, -1, -1)

    shared_logits = model(tiny_batch[0])
    model.prompts_for = expanded
    torch.testing.assert_close(model(tiny_batch[0]), shared_logits, rtol=1e-5, atol=1e-6)
    assert shared_flops < training_flops(model, tiny_batch)


def test_vpt_deep_backbone_alone_is_still_plain(tiny_batch):
    """Without prompt rows (the backbone called directly) the swapped blocks are timm's Block."""
    torch.manual_seed(0)
    fast = create_method("vpt_deep", make_tiny_vit(), num_classes=3).eval()
    torch.manual_seed(0)
    plain = plain_blocks(create_method("vpt_deep", make_tiny_vit(), num_classes=3)).eval()
    torch.testing.assert_close(fast.backbone.forward_features(tiny_batch[0]),
                               plain.backbone.forward_features(tiny_batch[0]))


def test_vpt_deep_keeps_plain_blocks_without_fused_attention(tiny_batch):
    """The key/value-only path mirrors the fused (SDPA) attention; with fused attention off it is not used."""
    from timm.models.vision_transformer import Block

    backbone = fused_off(make_tiny_vit())
    model = create_method("vpt_deep", backbone, num_classes=3, prompt_length=3)
    assert all(type(b) is Block for b in model.backbone.blocks)
    assert model(tiny_batch[0]).shape == (4, 3)


@pytest.mark.parametrize("method", list_methods())
def test_synthetic_batches_have_the_backbones_input_shape_for_every_method(method):
    """A method may wrap the patch conv (SSF): the perf batches still take the embedded ViT's 1 x 28 x 28 input."""
    from backbones import create_backbone
    from benchmark.costs.model_costs import synthetic_batches

    model = create_method(method, create_backbone("vit_embedded_p7_28"), 5)
    images, labels = synthetic_batches(model, PerfConfig(method=method, batch_size=3, num_classes=5)).tensors
    assert images.shape == (6, 1, 28, 28) and labels.shape == (6,) and int(labels.max()) < 5


@pytest.mark.parametrize(("backbone", "img_size"), [("resnet18", 32), ("convnext_atto", None)])
def test_convnet_rows_take_the_pretrained_config_channels_and_the_asked_size(backbone, img_size):
    # a ConvNet has no patch_embed: 3 channels from timm's pretrained config, the size asked (else its 224)
    from benchmark.costs.model_costs import input_shape

    cfg = PerfConfig(method="vpt_shallow", backbone=backbone, img_size=img_size, batch_size=2, num_classes=5,
                     steps=1, warmup=0, method_options={"prompt_length": 2})
    model, _ = build_model(cfg)
    assert input_shape(model) == (3, img_size or 224, img_size or 224)
    if img_size:  # one measured row on the tiny size; the pad bands around the 32 px image: 3 channels x
        # (top and bottom 2 x (32 + 2 * 2), left and right 2 x 32) x p = 2, and the 512 -> 5 head
        row = measure_method(cfg)
        assert row["img_size"] == 32 and row["train_img_s"] > 0 and row["flops_per_img"] > 0
        assert row["tuned_params"] == 3 * 2 * (2 * (32 + 4) + 2 * 32) + (512 * 5 + 5)

"""WiSE-FT: the model at weights (1 - alpha) * pretrained + alpha * tuned, alpha = 0, 0.25, ..., 1, scored on the
run's test set and its extra test sets (EXTRA_TEST). Wortsman et al., "Robust fine-tuning of zero-shot models",
CVPR 2022 (https://arxiv.org/abs/2109.01903), interpolate every weight of a fine-tuned model with its zero-shot one;
PETL_Vision (https://arxiv.org/abs/2409.16434) applies it to PEFT methods.

Unlike the rest of the report this evaluates models: it rebuilds each run from its checkpoint
(benchmark/core/rebuild.py), so it runs only when asked (`python -m benchmark.report --wise-ft`).

Which weights. For Full, every backbone tensor, from the pretrained backbone (the model built as the run built it,
before training) to the fine-tuned one. For the methods that merge their update into the frozen weights (LoRA, SSF,
RepAdapter: methods.base.MergeForEvalTuning) the weights are the merged ones, W0 + alpha * (W1 - W0) for each
merged layer: the interpolation of the plain timm model those methods export. Methods whose tuned tensors have no
pretrained value (prompts, adapters that do not merge) have no such path and are left out.
Ours, not the paper's: the head is the tuned head at every alpha. WiSE-FT's zero-shot model has a head (CLIP's text
embeddings); a pretrained vision backbone has none for these classes, so alpha = 0 reads the pretrained features
through the tuned head.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from benchmark.analysis.stats import seed_intervals
from methods.base import MergeForEvalTuning
from methods.registry import color, label, table_order

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEST_SET = "test"
# Where each merging layer keeps its merged copy, and the names of the frozen tensors the copy replaces, in order:
# methods/lora.py LoRALinear, methods/ssf.py SSF layers, methods/repadapter.py FoldableLinear.
MERGED_COPIES = {"merged_weight": ("weight",), "merged": ("weight", "bias"), "folded": ("weight", "bias")}
STYLES = ("-", "--", ":", "-.")


def interpolate(pretrained: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * pretrained + alpha * tuned, tensor by tensor (same names); an integer tensor (a BatchNorm's
    batch counter) is the tuned one."""
    if set(pretrained) != set(tuned):
        raise ValueError(f"WiSE-FT interpolates the same tensors: {sorted(set(pretrained) ^ set(tuned))[:3]} are in "
                         "one state only.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT alpha must lie in [0, 1], got {alpha}.")
    return {name: torch.lerp(pretrained[name].to(t.device, t.dtype), t, alpha) if t.is_floating_point() else t
            for name, t in tuned.items()}


def head_prefix(backbone: nn.Module) -> str:
    head = backbone.get_classifier()
    return next(name for name, module in backbone.named_modules() if module is head) + "."


class WeightPath:
    """The two ends of one model's interpolation and how to put a point between them into the model."""

    def __init__(self, pretrained: dict, tuned: dict, apply):
        self.pretrained, self.tuned, self.apply = pretrained, tuned, apply

    def set_alpha(self, alpha: float) -> None:
        self.apply(interpolate(self.pretrained, self.tuned, alpha))


def full_path(model: nn.Module, pretrained_model: nn.Module) -> WeightPath:
    """Every backbone tensor but the head's, from `pretrained_model` (built as the run built it) to `model`."""
    head = head_prefix(model.backbone)
    pick = lambda m: {k: v.detach().clone() for k, v in m.backbone.state_dict().items() if not k.startswith(head)}
    return WeightPath(pick(pretrained_model), pick(model),
                      lambda state: model.backbone.load_state_dict(state, strict=False))


def merged_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, layer, attribute) of every merged copy in `model`, once `merge_layers()` has run."""
    found = []
    for name, module in model.named_modules():
        for attribute in MERGED_COPIES:
            copy = getattr(module, attribute, None)
            if isinstance(copy, torch.Tensor) or (isinstance(copy, tuple) and copy
                                                   and all(isinstance(t, torch.Tensor) for t in copy)):
                found.append((name, module, attribute))
    return found


def merged_path(model: MergeForEvalTuning) -> WeightPath:
    """The merged weights of every merging layer, from its frozen (pretrained) tensors to its merged copy; a layer
    without a bias starts from zeros where its merged copy has one (RepAdapter and SSF fold a shift into it)."""
    model.merge_layers()
    layers = merged_layers(model)
    pretrained, tuned = {}, {}
    for name, module, attribute in layers:
        copies = getattr(module, attribute)
        copies = copies if isinstance(copies, tuple) else (copies,)
        for base_name, copy in zip(MERGED_COPIES[attribute], copies, strict=True):
            base = getattr(module, base_name)
            pretrained[f"{name}.{base_name}"] = (torch.zeros_like(copy) if base is None else base).detach().clone()
            tuned[f"{name}.{base_name}"] = copy.detach().clone()

    def apply(state: dict) -> None:
        for name, module, attribute in layers:
            values = tuple(state[f"{name}.{b}"] for b in MERGED_COPIES[attribute])
            setattr(module, attribute, values if isinstance(getattr(module, attribute), tuple) else values[0])

    return WeightPath(pretrained, tuned, apply)


def weight_path(model: nn.Module, pretrained_model: nn.Module | None) -> WeightPath | None:
    """Full's path or a merging method's; None for a method without one."""
    if isinstance(model, MergeForEvalTuning):
        return merged_path(model)
    if not model.frozen_backbone and pretrained_model is not None:
        return full_path(model, pretrained_model)
    return None


def has_weight_path(method: str) -> bool:
    from methods.registry import get_method_class

    cls = get_method_class(method)
    return issubclass(cls, MergeForEvalTuning) or not cls.frozen_backbone


def autocast(precision: str, device: torch.device):
    """The run's precision for a plain loop (Lightning's "bf16-mixed" / "16-mixed"; 32 as is)."""
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@torch.no_grad()
def top1(model: nn.Module, loader, device: torch.device, precision: str, allowed: torch.Tensor | None = None) -> float:
    """Test top-1 (%) in a plain loop: Lightning's test hooks would merge the layers again and undo the
    interpolated copies. `allowed` restricts the argmax to an extra test set's classes."""
    from datamodules.extra_test_sets import restricted_argmax

    correct = total = 0
    for images, labels in loader:
        with autocast(precision, device):
            logits = model(images.to(device))
        predicted = restricted_argmax(logits.float(), allowed.to(device)) if allowed is not None else logits.argmax(1)
        correct += int((predicted.cpu() == labels).sum())
        total += labels.numel()
    return 100 * correct / max(1, total)


def wise_ft_run(checkpoint: str | Path, alphas=ALPHAS) -> list[dict]:
    """[{set, alpha, top1}] for one run: its test set and each extra test set at every alpha."""
    import lightning as L

    from benchmark.core.artifacts import load_checkpoint
    from benchmark.core.pipeline import build_datamodule, build_model
    from benchmark.core.rebuild import checkpoint_config, rebuild
    from benchmark.core.validate import planned_data_config

    _, meta = load_checkpoint(checkpoint)
    cfg = checkpoint_config(meta)
    datamodule = build_datamodule(cfg, planned_data_config(cfg))
    datamodule.setup()
    model, cfg = rebuild(checkpoint, datamodule.num_classes)
    pretrained = None
    if not model.frozen_backbone:  # Full: the pretrained end is the model as the run built it
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        pretrained = build_model(cfg, datamodule.num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu")
    model.to(device).eval()
    path = weight_path(model, pretrained)
    del pretrained
    if path is None:
        raise ValueError(f"Checkpoint {str(checkpoint)!r} is of {cfg.method}, which has no weights to interpolate "
                         "(WiSE-FT covers Full and the methods that merge).")
    sets = [(TEST_SET, datamodule.test_dataloader(), None)]
    sets += [(name, loader, s.allowed()) for (name, s), loader in zip(datamodule.extra_tests.items(),
                                                                      datamodule.extra_test_dataloaders(),
                                                                      strict=True)]
    rows = []
    for alpha in alphas:
        path.set_alpha(alpha)
        rows += [{"set": name, "alpha": alpha, "top1": top1(model, loader, device, cfg.precision, allowed)}
                 for name, loader, allowed in sets]
    return rows


def wise_ft(final: pd.DataFrame, results_dir: str | Path, alphas=ALPHAS) -> pd.DataFrame:
    """Per run of Full or a merging method that kept a checkpoint: top-1 per test set and alpha."""
    rows = []
    for _, run in final.iterrows():
        checkpoint = run.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint or not has_weight_path(run["method"]):
            continue
        point = {k: run[k] for k in ("dataset", "method", "train_fraction", "seed")}
        rows += [point | row for row in wise_ft_run(Path(results_dir) / checkpoint, alphas)]
    return pd.DataFrame(rows, columns=["dataset", "method", "train_fraction", "seed", "set", "alpha", "top1"])


def wise_ft_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t interval over seeds per (dataset, method, fraction, set, alpha)."""
    return seed_intervals(runs, ["dataset", "method", "train_fraction", "set", "alpha"], "top1").rename(
        columns={"n": "n_seeds"})


def plot_wise_ft(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Top-1 against alpha, one panel per task and fraction, a colour per method, a line style per test set."""
    panels = sorted({(d, f) for d, f in zip(curves["dataset"], curves["train_fraction"], strict=True)})
    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=False))
    sets = [TEST_SET] + sorted(set(curves["set"]) - {TEST_SET})
    for ax, (dataset, fraction) in zip(axes, panels, strict=True):
        here = curves[(curves["dataset"] == dataset) & (curves["train_fraction"] == fraction)]
        for method in table_order(here["method"].unique()):
            for k, name in enumerate(sets):
                line = here[(here["method"] == method) & (here["set"] == name)].sort_values("alpha")
                if line.empty:
                    continue
                ax.plot(line["alpha"], line["mean"], marker="o", ls=STYLES[k % len(STYLES)], color=color(method),
                        label=label(method) + ("" if name == TEST_SET else f" ({name})"))
                if int(line["n_seeds"].max()) > 1:
                    ax.fill_between(line["alpha"], line["ci_low"], line["ci_high"], color=color(method), alpha=0.15,
                                    lw=0)
        ax.set_xticks(sorted(curves["alpha"].unique()))
        ax.set_xlabel("alpha (0: pretrained weights, 1: tuned)")
        ax.set_title(f"{dataset} @ {100 * fraction:g}%")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    n_seeds = int(curves["n_seeds"].max())
    axes[0].set_ylabel("top-1 (%)" + (f", band: 95% CI over {n_seeds} seeds" if n_seeds > 1 else ""))
    fig.suptitle(title or "WiSE-FT: weights interpolated between pretrained and tuned (the tuned head throughout)")
    return fig

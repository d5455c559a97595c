"""One benchmark run: config -> backbone + method + datamodule -> Lightning Trainer -> result JSON.

    python -m benchmark.run --method vpt_deep --fraction 0.1 [--dataset digits] [--seed 0] ...
"""

from __future__ import annotations

import argparse
import sys

import methods
from benchmark.core.cli import (
    add_method_options,
    add_switch,
    extra_test_sets,
    merged_method_options,
    method_options,
    one_option_point,
)
from benchmark.core.config import RunConfig, check_fraction, check_shots
from benchmark.core.errors import ConfigError
from benchmark.core.pipeline import run
from benchmark.core.store import is_storage_error, storage_problem


def fraction_arg(text: str) -> float:
    try:
        return check_fraction(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def shots_arg(text: str) -> int:
    try:
        return check_shots(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None

def backbone_kwargs(text: str) -> dict:
    """BACKBONE_ARGS: "k=v k=v" as create_model keyword arguments (values parsed as YAML, like METHOD_ARGS)."""
    return dict(method_options(text, "BACKBONE_ARGS"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="vpt_deep", help=f"one of {', '.join(methods.list_methods())}")
    p.add_argument("--fraction", dest="train_fraction", type=fraction_arg, default=0.1,
                   help="share of the train pool, in (0, 1]")
    p.add_argument("--shots", type=shots_arg, help="k training examples per class (few-shot) instead of a fraction")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", help="any timm ViT name; default: embedded ViT / vit_base_patch16_224.orig_in21k")
    p.add_argument("--weights", help="local checkpoint (.npz, .pth/.pt, .safetensors)")
    add_switch(p, "--pretrained", default=True, help="pretrained weights (0: random init, the no-pretraining control)")
    p.add_argument("--scratch", dest="pretrained", action="store_false", help="random init: --pretrained=0")
    p.add_argument("--recipe", help="quick (embedded default), paper, or the path of a recipe .yaml file")
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", "--wd", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--head-init", choices=["pytorch", "vpt"], help="default: the recipe's (paper: vpt)")
    add_method_options(p, "method option, e.g. prompt_length=10 or reduction=8")
    p.add_argument("--options", type=one_option_point, default={}, metavar='"K=V;K2=V2"',
                   help="method options that also name the run (one point of a grid's OPTIONS), e.g. prompt_length=5")
    p.add_argument("--extra-test", type=extra_test_sets, default={}, metavar="NAME=DIR,...",
                   help="extra test sets evaluated after training: folders of class folders named like the training "
                   "classes (domain shift), e.g. sketch=/data/imagenet-sketch")
    p.add_argument("--backbone-args", dest="backbone_kwargs", type=backbone_kwargs, default={}, metavar='"K=V ..."',
                   help='timm create_model arguments of the backbone (BACKBONE_ARGS=), e.g. "img_size=224" for DINOv2')
    p.add_argument("--data-root")
    p.add_argument("--train-on", choices=["train", "trainval"], default="train")
    p.add_argument("--results-dir", "--results", default="results")
    p.add_argument("--tag", default="")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", help="per node: a count, a list like 0,1, or auto")
    p.add_argument("--num-nodes", type=int, default=1, help="machines of this one run (e.g. SLURM --nodes)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (one run over several devices)")
    p.add_argument("--precision", help="Lightning precision, e.g. bf16-mixed (autocast; GPU) or 32")
    add_switch(p, "--compile", help="torch.compile the model")
    add_switch(p, "--checkpointing", help="gradient checkpointing of the backbone blocks")
    add_switch(p, "--feature-cache", default=True,
               help="linear probe: train on cached frozen features (0: run the backbone every epoch)")
    p.add_argument("--no-feature-cache", dest="feature_cache", action="store_false", help="--feature-cache=0")
    add_switch(p, "--image-cache", help="image-file datasets: decode and resize each image once into a memory-mapped "
               "cache; crop, flip and normalise on the training device (docs/performance.md)")
    add_switch(p, "--wandb", help="log to Weights & Biases")
    add_switch(p, "--force", help="rerun even if a result exists")
    return p

def config_from_args(argv: list[str] | None = None) -> RunConfig:
    args = parser().parse_args(argv)
    args.method_options = merged_method_options(args)
    del args.method_options_list
    return RunConfig(**vars(args))

def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 ok (or already done, or claimed: another live process trains it), 1 the run failed (recorded),
    2 bad input (nothing ran)."""
    cfg = None
    try:
        cfg = config_from_args(argv)
        result = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_storage_error(err):
            raise
        print(f"error: {storage_problem(err, cfg and cfg.results_dir)}", file=sys.stderr)
        return 1
    return 0 if result.get("status") in ("ok", "claimed") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain the embedded backbone: the `full` method on the Fashion-MNIST pretraining classes, from scratch.

    python -m benchmark.pretrain [--epochs 5] [--out results/embedded]

Writes `vit_embedded_p7_28.safetensors` (backbone + upstream head) and `vit_embedded_p7_28.json` recording
the command, data, metrics, versions and the weights' sha256, so anyone can rebuild and check them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from torchvision.transforms import v2

from backbones import create_backbone, data_config
from benchmark.core.cli import add_switch
from benchmark.core.config import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS
from benchmark.core.provenance import git_commit, versions
from benchmark.core.store import atomic_write_json
from datamodules.embedded import FMNIST_CLASSES, FMNIST_DIR, PRETRAIN_CLASSES, FashionPretrainDataModule
from methods import OptimConfig, create_method


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Augmented(Dataset):
    """Random 2-px shifts and horizontal flips of (image, label) tensors: features that transfer beyond
    the six pretraining classes rather than memorise their exact pixels (both are label-preserving for clothes)."""

    def __init__(self, dataset: Dataset, padding: int = 2):
        self.dataset = dataset
        self.transform = v2.Compose([v2.RandomCrop(28, padding=padding, padding_mode="edge"),
                                     v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


def pretrain(epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int, out: Path,
             augment: bool = True) -> dict:
    L.seed_everything(seed, workers=True, verbose=False)
    backbone = create_backbone(EMBEDDED_BACKBONE)
    datamodule = FashionPretrainDataModule(data_config=data_config(backbone), batch_size=batch_size, seed=seed)
    datamodule.setup()
    if augment:
        datamodule.train_set = Augmented(datamodule.train_set)
    optim = OptimConfig(optimizer="adamw", lr=lr, weight_decay=weight_decay, warmup_epochs=0.5, max_epochs=epochs)
    model = create_method("full", backbone, datamodule.num_classes, optim)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_model_summary=False, deterministic=True)
    started = time.time()
    trainer.fit(model, datamodule=datamodule)
    test_top1 = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"] * 100
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{EMBEDDED_BACKBONE}.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    record = {
        "command": "python -m benchmark.pretrain " + " ".join(sys.argv[1:]),
        "backbone": EMBEDDED_BACKBONE, "weights": weights.name, "sha256": sha256(weights),
        "data": {"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "path": str(FMNIST_DIR),
                 "classes": [FMNIST_CLASSES[c] for c in PRETRAIN_CLASSES], "n_train": datamodule.n_train},
        "recipe": {"optimizer": "adamw", "lr": lr, "weight_decay": weight_decay, "epochs": epochs,
                   "batch_size": batch_size, "seed": seed, "augment": augment},
        "upstream_test_top1": test_top1, "wall_seconds": time.time() - started,
        "threads": torch.get_num_threads(), "git_commit": git_commit(), "versions": versions(),
    }
    atomic_write_json(out / f"{EMBEDDED_BACKBONE}.json", record)
    print(f"Pretrained {EMBEDDED_BACKBONE}: upstream test top-1 {test_top1:.2f} in {record['wall_seconds']:.0f}s "
          f"-> {weights} (sha256 {record['sha256'][:12]}...)")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", "--wd", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_switch(p, "--augment", default=True, help="random shifts/flips (0: none)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="--augment=0")
    p.add_argument("--out", type=Path, default=EMBEDDED_WEIGHTS.parent)
    args = p.parse_args(argv)
    pretrain(args.epochs, args.lr, args.weight_decay, args.batch_size, args.seed, args.out, args.augment)
    return 0


if __name__ == "__main__":
    sys.exit(main())

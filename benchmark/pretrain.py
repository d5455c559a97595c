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
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from torchvision.transforms import v2

from backbones import create_backbone, data_config
from benchmark.core.cli import add_settings
from benchmark.core.config import EMBEDDED_BACKBONE, EMBEDDED_WEIGHTS, setting
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


@dataclass
class PretrainSettings:
    """The flags of `make pretrain`, each declared once (benchmark.core.cli.add_settings); the defaults made the
    committed embedded weights (results/embedded/)."""

    epochs: int = setting(5, "epochs over the pretraining classes of Fashion-MNIST")
    lr: float = setting(1e-3, "AdamW learning rate")
    weight_decay: float = setting(0.05, "AdamW weight decay", flags=("--weight-decay", "--wd"))
    batch_size: int = setting(128, "images per step")
    seed: int = setting(0, "seeds the init and the data order")
    augment: bool = setting(True, "random shifts/flips (0: none)", off="--no-augment")
    out: Path = setting(EMBEDDED_WEIGHTS.parent, "the folder of the weights and their record")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, PretrainSettings)
    args = PretrainSettings(**vars(p.parse_args(argv)))
    pretrain(args.epochs, args.lr, args.weight_decay, args.batch_size, args.seed, args.out, args.augment)
    return 0


if __name__ == "__main__":
    sys.exit(main())

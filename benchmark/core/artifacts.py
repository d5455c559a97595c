"""What a run keeps besides its result JSON (issue 28): the tensors it trained, its per-image test logits and its
per-epoch curves. Written by rank 0 through the store's one atomic writer, at paths built by `results_path`:

    <results>/checkpoints/<run_id>.safetensors   the trained tensors + the metadata that rebuilds the model
    <results>/predictions/<run_id>.npz           test logits (float16), labels and image ids, compressed

Beside splits/<run_id>.json and logs/<run_id>/, not in runs/: runs/ stays the small JSON records that the report,
the summary and the claims read, and a results folder can be copied without its binaries by leaving two folders out.
A checkpoint holds what trained: the parameters with requires_grad (prompts, adapters, head, ...; for Full every
parameter of the model, i.e. the whole model) plus the persistent buffers of the modules that ran in train mode (a
fine-tuned BatchNorm's running statistics; none for a frozen backbone's modules, which stay in eval mode).
`load_checkpoint` refuses a truncated file, a file that is not one of ours, or a class count that does not match,
in one line naming the file and the fix; benchmark/core/rebuild.py builds the model again from one.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write, results_path

FORMAT = "vpt-bench-checkpoint/1"  # bump when what a checkpoint holds (or how it is read) changes
META_KEY = "vpt_bench"  # the safetensors metadata entry holding our JSON


def checkpoint_path(results_dir: str | Path, run_id: str) -> Path:
    return results_path(results_dir, "checkpoints", f"{run_id}.safetensors")


def predictions_path(results_dir: str | Path, run_id: str) -> Path:
    return results_path(results_dir, "predictions", f"{run_id}.npz")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_source(cfg) -> dict:
    """Where the backbone's pretrained weights came from: a local file and its sha256, timm's hub, or none."""
    if not cfg.pretrained:
        return {"kind": "random-init"}
    if cfg.weights:
        return {"kind": "file", "path": str(cfg.weights), "sha256": file_sha256(cfg.weights)}
    return {"kind": "hub", "name": cfg.backbone}


def trained_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({name: tensor}, buffer names): every parameter with requires_grad, plus the persistent buffers of the
    modules that train in train mode (none of a frozen backbone's pretrained modules; all of Full's)."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = {id(m) for m in getattr(model, "pretrained_modules", [])}
    if not getattr(model, "frozen_backbone", True):
        frozen = set()
    buffers = []
    for module_name, module in model.named_modules():
        if id(module) in frozen:
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set or buffer is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            if full not in tensors:
                tensors[full] = buffer
                buffers.append(full)
    return tensors, buffers


def backbone_digest(model: torch.nn.Module, trained: set[str]) -> str:
    """sha256 over every state-dict tensor of `model` that is not in `trained` (name, dtype, shape, bytes): the
    frozen rest a checkpoint is applied to. Shared tensors count under each name, so a rebuilt model gives the same
    digest once the checkpoint's tensors are in it (for Full: the digest of the non-trained buffers only)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in trained:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def checkpoint_metadata(cfg, model: torch.nn.Module, source, test_top1: float, git_commit: str | None) -> dict:
    """What rebuilds a run's model from its checkpoint (benchmark/core/rebuild.py) and what evaluate checks a
    checkpoint against: method and options, head init, backbone, its weights' source, the classes, the run's config.
    `source` is the run's datamodule (its class names); `cfg` the run's resolved RunConfig."""
    return {"run_id": cfg.run_id(), "method": cfg.method, "method_options": cfg.method_options,
            "head_init": cfg.head_init, "backbone": cfg.backbone, "backbone_kwargs": cfg.backbone_kwargs,
            "weights": weights_source(cfg), "num_classes": source.num_classes,
            "class_names": list(source.class_names), "whole_model": not model.frozen_backbone,
            "test_top1": test_top1, "git_commit": git_commit, "config": asdict(cfg)}


def checkpoint_bytes(model: torch.nn.Module, metadata: dict) -> bytes:
    tensors, buffers = trained_tensors(model)
    meta = metadata | {"format": FORMAT, "buffers": buffers,
                       "tuned_params": sum(t.numel() for n, t in tensors.items() if n not in buffers),
                       "backbone_digest": backbone_digest(model, set(tensors))}
    # safetensors wants contiguous tensors that share no memory; clone() gives each its own
    data = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    return save_safetensors(data, metadata={META_KEY: json.dumps(meta, default=str)})


def save_checkpoint(path: str | Path, model: torch.nn.Module, metadata: dict) -> dict:
    """Write the model's trained tensors with `metadata` atomically (a crash leaves the previous file); returns what
    the result records: {"checkpoint_bytes", "checkpoint_sha256"}."""
    blob = checkpoint_bytes(model, metadata)
    atomic_write(path, lambda f: f.write(blob))
    return {"checkpoint_bytes": len(blob), "checkpoint_sha256": hashlib.sha256(blob).hexdigest()}


def load_checkpoint(path: str | Path, num_classes: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint written by `save_checkpoint`. Raises ConfigError in one line naming the
    file and the fix: missing, truncated or not ours, or made for another class count than `num_classes`."""
    path = Path(path)
    rerun = "rerun the run with FORCE=1 to write it again"
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"Checkpoint {str(path)!r} cannot be read ({err.strerror or err}): {rerun}.") from None
    try:
        tensors = load_safetensors(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, OverflowError) as err:
        raise ConfigError(f"Checkpoint {str(path)!r} is truncated or not a vpt-bench checkpoint "
                          f"({type(err).__name__}: {str(err)[:80]}): {rerun}.") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"Checkpoint {str(path)!r} has format {meta.get('format')!r}, this code reads {FORMAT!r}: "
                          f"{rerun}, or read it with the code of its git commit ({meta.get('git_commit')}).")
    if num_classes is not None and meta.get("num_classes") != num_classes:
        raise ConfigError(f"Checkpoint {str(path)!r} has {meta.get('num_classes')} classes, the dataset here has "
                          f"{num_classes}: score it on its own dataset ({meta.get('config', {}).get('dataset')}) or "
                          "one with the same classes.")
    return tensors, meta


def load_trained_tensors(model: torch.nn.Module, path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's tensors into a freshly built model of the same method and options; refuses (ConfigError,
    naming the file) when the names or shapes differ from what this model trains."""
    expected, _ = trained_tensors(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tuple(expected[n].shape) != tuple(tensors[n].shape))
    if missing or extra or wrong:
        raise ConfigError(f"Checkpoint {str(path)!r} does not fit this model (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}, other shapes {wrong[:3]}): rebuild it with the method, options and backbone "
                          "its metadata names.")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.device, target.dtype))


def save_predictions(path: str | Path, logits: torch.Tensor, labels, ids: list[str]) -> int:
    """Per-image test logits as float16, with labels and image ids, compressed (np.savez_compressed), atomically;
    returns the file's size in bytes."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, logits=logits.detach().cpu().to(torch.float16).numpy(),
                        labels=np.asarray(labels, dtype=np.int64), ids=np.asarray(ids, dtype=str))
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    return buffer.getbuffer().nbytes


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in ("logits", "labels", "ids")}
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"Predictions file {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:80]}): "
                          "rerun the run with FORCE=1 to write it again.") from None


def check_predictions(path: str | Path, ids, labels) -> dict[str, np.ndarray]:
    """The predictions file at `path`, refused (ConfigError, one line naming the file and the fix) when its image ids
    or labels are not `ids` and `labels`, in order: the test set it is read against (the run's, or the one the data
    folder holds now)."""
    found = load_predictions(path)
    ids, labels = [str(i) for i in ids], [int(y) for y in labels]
    kept = found["ids"].tolist()
    if kept != ids:
        differ = sum(a != b for a, b in zip(kept, ids, strict=False)) + abs(len(kept) - len(ids))
        raise ConfigError(f"Predictions file {str(path)!r} holds {len(kept)} image ids, this test set {len(ids)}, "
                          f"{differ} of them differ: point DATA_ROOT= at the data the run used, or rerun the run "
                          "with FORCE=1.")
    if found["labels"].tolist() != labels:
        raise ConfigError(f"Predictions file {str(path)!r} has other labels than this test set for the same image "
                          "ids: point DATA_ROOT= at the data the run used, or rerun the run with FORCE=1.")
    return found


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes (and a README)


def peft_adapter_path(results_dir: str | Path, run_id: str) -> Path:
    """The folder of a peft tuner's adapter in peft's own format, beside its checkpoint."""
    return results_path(results_dir, "checkpoints", f"{run_id}.peft")


def save_peft_adapter(folder: str | Path, model: torch.nn.Module, backbone: str) -> bool:
    """A peft tuner's trained adapter and head in peft's own format (adapter_config.json + adapter_model.safetensors,
    as `PeftModel.save_pretrained` writes them; the head as `modules_to_save`), so that
    `PeftModel.from_pretrained(<the pretrained timm backbone with num_classes=C>, folder)` loads it.
    peft's writer does it: a copy of the backbone with each peft layer replaced by its base layer (the pretrained
    model again: some tuners initialise from its weights) is wrapped by `peft.get_peft_model`, given this model's
    trained tensors and saved. Each file is written atomically. Returns False (writing nothing) for a method that is
    not a peft tuner."""
    import peft  # only peft tuners need it here
    from peft.tuners.tuners_utils import BaseTunerLayer

    from methods.peft_tuners import PeftTuning

    if not isinstance(model, PeftTuning):
        return False
    head = model.backbone.pretrained_cfg["classifier"]
    config = model.peft_config()
    config.modules_to_save = [head]
    plain = copy.deepcopy(model.backbone).cpu()
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, BaseTunerLayer)]:
        plain.set_submodule(name, layer.get_base_layer())
    plain.__dict__.pop("peft_config", None)
    plain.name_or_path = backbone  # what peft records as base_model_name_or_path
    wrapped = peft.get_peft_model(plain, config)
    targets = {**dict(wrapped.base_model.model.named_parameters()), **dict(wrapped.base_model.model.named_buffers())}
    tensors, _ = trained_tensors(model)
    with torch.no_grad():
        for name, tensor in tensors.items():
            name = name.removeprefix("backbone.")
            key = name if name in targets else name.replace(f"{head}.", f"{head}.modules_to_save.default.", 1)
            targets[key].copy_(tensor)
    with tempfile.TemporaryDirectory() as scratch:
        wrapped.save_pretrained(scratch, save_embedding_layers=False)
        for name in PEFT_FILES:
            data = (Path(scratch) / name).read_bytes()
            atomic_write(Path(folder) / name, lambda f, data=data: f.write(data))
    return True


class TestLogits(L.Callback):
    """Keeps the logits and labels of every test batch, in loader order: a forward hook on the model for the length
    of `trainer.test` (test_step returns nothing, and no second pass over the test set is needed)."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self._hook = None

    def on_test_start(self, trainer, pl_module):
        self.logits, self.labels = [], []
        self._hook = pl_module.register_forward_hook(
            lambda module, args, output: self.logits.append(output.detach().float().cpu()))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.labels.append(torch.as_tensor(batch[1]).detach().cpu())

    def on_test_end(self, trainer, pl_module):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def collected(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.logits), torch.cat(self.labels)


class EpochCurves(L.Callback):
    """Per-epoch train loss and val top-1 (%) read from the trainer's callback metrics at each epoch's end (the val
    loop has run by then), and with `audit` (AUDIT=1) the test top-1 of each epoch's weights, scored on
    the loaders' test split without touching the random state that training draws from."""

    def __init__(self, audit: bool = False, loaders: L.LightningDataModule | None = None):
        self.audit = audit
        self.loaders = loaders
        self.curves: dict[str, list] = {"epoch": [], "train_loss": [], "val_top1": []}
        if audit:
            self.curves["test_top1"] = []

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self.curves["epoch"].append(trainer.current_epoch)
        self.curves["train_loss"].append(float(metrics["train/loss"]) if "train/loss" in metrics else None)
        self.curves["val_top1"].append(float(metrics["val/acc"]) * 100 if "val/acc" in metrics else None)
        if self.audit:
            self.curves["test_top1"].append(self.test_top1(trainer, pl_module))

    def test_top1(self, trainer, pl_module) -> float:
        was_training = pl_module.training
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        correct = torch.zeros((), dtype=torch.long, device=pl_module.device)
        total = torch.zeros((), dtype=torch.long, device=pl_module.device)
        pl_module.eval()
        pl_module.on_test_start()  # a merging method merges as it does for the test
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for batch in self.loaders.test_dataloader():
                    # the trainer's own transfer: the datamodule's on-device transforms (the image cache) included
                    images, labels = pl_module._apply_batch_transfer_handler(batch)
                    correct += (pl_module(images).argmax(dim=1) == labels).sum()
                    total += labels.numel()
        finally:
            pl_module.on_test_end()
            pl_module.train(was_training)
        correct = trainer.strategy.reduce(correct, reduce_op="sum")
        total = trainer.strategy.reduce(total, reduce_op="sum")
        return float(correct) / max(1, int(total)) * 100

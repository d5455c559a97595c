"""What one method costs to train and evaluate on a backbone: images per second, peak memory, FLOPs per image and
the share of the device's matmul peak they reach. `python -m benchmark.perf` runs each method in its own process."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from benchmark.core.config import EMBEDDED_BACKBONE
from benchmark.core.pipeline import apply_speed_options
from benchmark.core.provenance import peak_memory_mb

LOADER_DATASET = "digits"  # the embedded default


@dataclass
class PerfConfig:
    method: str = "full"
    backbone: str = EMBEDDED_BACKBONE
    batch_size: int = 64
    img_size: int | None = None  # None: the backbone's own
    backbone_kwargs: dict = field(default_factory=dict)  # timm create_model arguments (a tiny ViT for CPU checks)
    num_classes: int = 100
    steps: int = 10  # timed training (and evaluation) steps; the median is reported
    warmup: int = 2  # untimed steps first (allocator, caches, compilation)
    precision: str = "32"  # Lightning precision: 32, bf16-mixed (GPU autocast), 16-mixed
    compile: bool = False
    compile_backend: str | None = None  # None: torch.compile's default (inductor)
    checkpointing: bool = False
    method_options: dict = field(default_factory=dict)
    optimizer: str = "sgd"  # the recipe's: its state (momentum; AdamW's two moments) is part of the memory
    profile: bool = False  # print where the training steps spend their time (torch.profiler, by operator)

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}.")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}.")

def _register_cpu_attention_flops() -> None:
    """torch's counter knows the CUDA SDPA kernels but not the CPU flash kernel timm's fused attention uses."""
    aten = torch.ops.aten
    try:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    except (AttributeError, RuntimeError):  # op absent, or a newer torch already counts it
        pass

_register_cpu_attention_flops()


def training_flops(model: L.LightningModule, batch) -> int:
    """FLOPs of one training forward + backward on `batch` (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _, _ = model.model_step(batch)
        if loss.requires_grad:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()

def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, sizes=(1024, 2048),
                       repeats: int = 5) -> float:
    """Best median GFLOP/s of square dense matmuls: the practical peak the models are compared with."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times[1:]) / 1e9)
    return best

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def current_memory_mb(device: torch.device) -> float:
    """Memory held now: CUDA allocated, or this process's resident set (Linux /proc; else the peak)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_memory_mb(device)
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20

class StepTimer(L.Callback):
    """Wall time of every train / test batch, from the batch-start hook to the batch-end hook."""

    def __init__(self, device: torch.device):
        self.device = device
        self.train, self.test = [], []
        self._start = 0.0
        self.inference_mode: bool | None = None  # whether evaluation ran under torch.inference_mode

    def _begin(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _end(self, into: list) -> None:
        synchronize(self.device)
        into.append(time.perf_counter() - self._start)

    def on_train_batch_start(self, *args, **kwargs):
        self._begin()

    def on_train_batch_end(self, *args, **kwargs):
        self._end(self.train)

    def on_test_batch_start(self, *args, **kwargs):
        self._begin()

    def on_test_batch_end(self, *args, **kwargs):
        self._end(self.test)
        self.inference_mode = torch.is_inference_mode_enabled()

def build_model(cfg: PerfConfig):
    """The method on a randomly initialised backbone: weights do not change the cost."""
    from backbones import create_backbone, data_config
    from methods import OptimConfig, create_method

    extra = {}
    if cfg.img_size:
        with torch.device("meta"):  # free: does the family fix its token grid when built?
            probe = create_backbone(cfg.backbone, pretrained=False, **cfg.backbone_kwargs)
        if hasattr(probe, "patch_embed"):  # a ViT or Swin is built for the image size
            extra = {"img_size": cfg.img_size}
        else:  # a ConvNet takes any size: its data config says which (the pixel prompts are sized by it)
            channels = data_config(probe)["input_size"][0]
            extra = {"pretrained_cfg_overlay": {"input_size": (channels, cfg.img_size, cfg.img_size)}}
    backbone = create_backbone(cfg.backbone, pretrained=False, **{**cfg.backbone_kwargs, **extra})
    optim = OptimConfig(optimizer=cfg.optimizer, lr=1e-3, max_epochs=1, warmup_epochs=0)
    model = create_method(cfg.method, backbone, cfg.num_classes, optim, **cfg.method_options)
    return model, apply_speed_options

def input_shape(model) -> tuple[int, int, int]:
    """(channels, height, width) of the images the method's backbone takes."""
    from backbones import data_config
    patch_embed = getattr(model.backbone, "patch_embed", None)
    if patch_embed is not None:  # ViT, Swin: built for one size; the channels from the patch conv's weight
        # (out, in, kh, kw), since a method may wrap the conv (SSF's ScaleShift)
        return (patch_embed.proj.weight.shape[1], *patch_embed.img_size)
    return data_config(model.backbone)["input_size"]  # a ConvNet: its (overlaid) pretrained config's


def synthetic_batches(model, cfg: PerfConfig, n_batches: int = 2) -> TensorDataset:
    channels, height, width = input_shape(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_batches * cfg.batch_size, channels, height, width, generator=g)
    return TensorDataset(images, torch.randint(0, cfg.num_classes, (len(images),), generator=g))

def measure_method(cfg: PerfConfig) -> dict:
    """Time one method with a Lightning Trainer on synthetic batches; returns one perf.csv row."""
    L.seed_everything(0, verbose=False)
    model, apply_speed_options = build_model(cfg)
    data = synthetic_batches(model, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model_mb = current_memory_mb(device)  # interpreter, libraries, model and batches: before any step
    # Checkpointing before counting (its recomputation is executed work); compiling after (the counter sees eager ops).
    apply_speed_options(model, compile=False, checkpointing=cfg.checkpointing)
    flops = training_flops(model, [t[: cfg.batch_size].to(device) for t in data.tensors])
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    apply_speed_options(model, compile=cfg.compile, checkpointing=False, compile_backend=cfg.compile_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    steps = cfg.warmup + cfg.steps
    order = [i % len(data) for i in range(steps * cfg.batch_size)]  # the same few batches, cycled
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=order)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, precision=cfg.precision,
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    if cfg.profile:
        with torch.profiler.profile() as profiler:
            trainer.fit(model, train_dataloaders=loader)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    else:
        trainer.fit(model, train_dataloaders=loader)
    train_peak_mb = peak_memory_mb(device)
    if device.type == "cuda":  # evaluation's own peak (on CPU the process's peak RSS is all there is)
        torch.cuda.reset_peak_memory_stats(device)
    trainer.test(model, dataloaders=loader, verbose=False)
    step = statistics.median(timer.train[cfg.warmup:])
    eval_step = statistics.median(timer.test[cfg.warmup:])
    train_img_s = cfg.batch_size / step
    return {
        "method": cfg.method, "backbone": cfg.backbone, "batch_size": cfg.batch_size,
        "img_size": input_shape(model)[1], "device": device_name(device),
        "precision": cfg.precision, "compile": cfg.compile, "checkpointing": cfg.checkpointing,
        "method_options": json.dumps(cfg.method_options, sort_keys=True), "optimizer": cfg.optimizer,
        "train_step_ms": 1000 * step, "train_img_s": train_img_s, "eval_img_s": cfg.batch_size / eval_step,
        "peak_mem_mb": train_peak_mb, "train_mem_mb": train_peak_mb - model_mb,
        "eval_peak_mem_mb": peak_memory_mb(device),
        "flops_per_img": flops / cfg.batch_size,
        "achieved_gflops": flops / cfg.batch_size * train_img_s / 1e9,
        "tuned_params": model.tuned_params, "total_params": model.total_params,
        "fused_attn": bool(fused) and all(fused), "eval_inference_mode": timer.inference_mode,
        "timed_steps": len(timer.train) - cfg.warmup, "threads": torch.get_num_threads(),
    }

def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"

def loader_img_s(backbone: str, batch_size: int, epochs: int = 20) -> float:
    """Images/s of the embedded default's training loader (full training pool, the run's settings)."""
    from backbones import create_backbone, data_config
    from datamodules import create_datamodule

    datamodule = create_datamodule(LOADER_DATASET, data_config=data_config(create_backbone(backbone)),
                                   train_fraction=1.0, batch_size=batch_size)
    datamodule.setup()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _labels in datamodule.train_dataloader():
            seen += len(images)
    return seen / (time.perf_counter() - start)

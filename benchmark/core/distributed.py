"""One run over several processes (Lightning DDP: `DEVICES=2 STRATEGY=ddp`, `NUM_NODES=`): the data side.

What a multi-process run needs beyond Lightning's defaults, so that it measures the same thing as one process:

- The recipe's batch size is the *global* batch, as in the VPT code (each of its NUM_GPUS processes loads
  BATCH_SIZE / NUM_GPUS images per step): steps per epoch, the lr schedule and the batch/256 lr rule of a
  recipe stay those of the single-process run. Each process loads BATCH_SIZE / world size examples.
- Val and test see every example exactly once. Lightning's injected DistributedSampler pads an evaluation set
  with repeated examples until it divides by the number of processes, so those would count twice in top-1;
  here each process evaluates every world-size-th example (Lightning's UnrepeatedDistributedSampler) and the
  torchmetrics accuracy objects sum their counts over all processes when Lightning computes them.
- Training shards are DistributedSampler's: one seeded permutation per epoch, shared by all processes, cut
  into disjoint equal slices (padded by at most world size - 1 repeated examples, so every process takes the
  same number of steps, which DDP's gradient all-reduce requires).

The loaders are rebuilt here rather than left to Lightning's sampler injection because that injection reuses
a loader's constructor arguments, and a loader built on a `batch_sampler` (the feature cache's) comes back
with batch size 1.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from benchmark.core.errors import ConfigError


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """The batch each of `world_size` processes loads so that together they make the recipe's batch."""
    if batch_size % world_size:
        fits = [b for b in (batch_size - batch_size % world_size, batch_size + world_size - batch_size % world_size)
                if b > 0]
        raise ConfigError(f"BATCH_SIZE={batch_size} is the global batch of a run; it must divide by the run's "
                          f"{world_size} processes (DEVICES x NUM_NODES). Set BATCH_SIZE={' or '.join(map(str, fits))}"
                          f", or a number of devices that divides {batch_size}.")
    return batch_size // world_size


def loader_batch_size(loader: DataLoader) -> int:
    return loader.batch_size if loader.batch_size is not None else loader.batch_sampler.batch_size


def shuffles(loader: DataLoader) -> bool:
    sampler = loader.sampler if loader.batch_size is not None else loader.batch_sampler.sampler
    return isinstance(sampler, RandomSampler)


def with_sampler(loader: DataLoader, sampler: Sampler, batch_size: int) -> DataLoader:
    """`loader` with another sampler and batch size; workers, collate, seeding and pinning unchanged."""
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator, persistent_workers=loader.persistent_workers)


class ProcessShardedData(L.LightningDataModule):
    """`source`'s loaders for one process of a multi-process run (see the module docstring).

    `source` must be set up; its own attributes (n_train, split_record, ...) stay on it.
    """

    def __init__(self, source: L.LightningDataModule, world_size: int, rank: int, seed: int):
        super().__init__()
        self.source, self.world_size, self.rank, self.seed = source, world_size, rank, seed

    def train_dataloader(self) -> DataLoader:
        loader = self.source.train_dataloader()
        sampler = DistributedSampler(loader.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=shuffles(loader), seed=self.seed)
        return with_sampler(loader, sampler, per_process_batch_size(loader_batch_size(loader), self.world_size))

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        return self.source.on_after_batch_transfer(batch, dataloader_idx)  # the image cache's on-device transform

    def val_dataloader(self) -> DataLoader:
        return each_example_once(self.source.val_dataloader(), self.world_size, self.rank)

    def test_dataloader(self) -> DataLoader:
        return each_example_once(self.source.test_dataloader(), self.world_size, self.rank)


def each_example_once(loader: DataLoader, world_size: int, rank: int) -> DataLoader:
    """An evaluation loader for process `rank` of `world_size`: every world-size-th example, none repeated;
    `loader` itself for one process."""
    if world_size == 1:
        return loader
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return with_sampler(loader, sampler, loader_batch_size(loader))


def for_this_process(datamodule: L.LightningDataModule, trainer: L.Trainer, seed: int) -> L.LightningDataModule:
    """The datamodule to hand the trainer: unchanged for one process, sharded across several."""
    if trainer.world_size == 1:
        return datamodule
    return ProcessShardedData(datamodule, trainer.world_size, trainer.global_rank, seed)


def gather_in_test_order(all_gather, logits: torch.Tensor, labels: torch.Tensor, world_size: int, rank: int,
                         n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's test logits (B_r, C) and labels, as one (n, C) and (n,) in the test set's order: process r
    scored the examples its `each_example_once` sampler gave it. `all_gather` is Lightning's strategy.all_gather
    (a (world size, ...) stack of equal shapes), so each share is padded to the longest first. One process: as is."""
    if world_size == 1:
        return logits, labels
    shares = [list(UnrepeatedDistributedSampler(range(n), num_replicas=world_size, rank=r, shuffle=False))
              for r in range(world_size)]
    longest = max(len(share) for share in shares)
    if len(labels) != len(shares[rank]):
        raise RuntimeError(f"process {rank} scored {len(labels)} test examples, its share is {len(shares[rank])}")
    pad = longest - len(labels)
    every_logits = all_gather(torch.nn.functional.pad(logits, (0, 0, 0, pad)))  # (W, longest, C)
    every_labels = all_gather(torch.nn.functional.pad(labels, (0, pad), value=-1))  # (W, longest)
    ordered_logits = logits.new_empty((n, logits.shape[1]))
    ordered_labels = labels.new_empty((n,))
    for r, share in enumerate(shares):
        ordered_logits[share] = every_logits[r, :len(share)].to(logits.device)
        ordered_labels[share] = every_labels[r, :len(share)].to(labels.device)
    return ordered_logits, ordered_labels

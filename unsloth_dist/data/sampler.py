"""The world-size-invariant global batch order.

The sequence of global batches depends only on the dataset length, the seed and the global
batch size: epoch `e` is a permutation drawn from a generator seeded with `seed + e`, cut into
consecutive global batches (the incomplete tail is dropped). A rank then takes its micro-batches
out of each global batch. Because the loss is normalised by the global token count, how the
samples of one global batch fall across ranks and micro-batches does not change the update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatchSampler:
    num_samples: int
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"the training set has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch_size} (per_device_train_batch_size x gradient_accumulation_steps x "
                "world size); add data or lower the batch size"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of global batch number `step` (0-based, counting across epochs)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[pos * self.global_batch_size : (pos + 1) * self.global_batch_size]

    def local_micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro-batches of global batch `step`, in accumulation order."""
        batch = self.global_batch(step)
        per_micro = micro_batch_size * world_size
        if len(batch) % per_micro:
            raise ValueError(f"global batch {len(batch)} is not a multiple of micro_batch x world = {per_micro}")
        micros = []
        for m in range(len(batch) // per_micro):
            start = m * per_micro + rank * micro_batch_size
            micros.append(batch[start : start + micro_batch_size])
        return micros

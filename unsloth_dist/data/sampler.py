"""The world-size-invariant global batch order.

The sequence of global batches depends only on the dataset length, the seed and the global
batch size: epoch `e` is a permutation drawn from a generator seeded with `seed + e` (the
dataset's own order without shuffling), the epochs follow one another as one stream of samples,
and the stream is cut into consecutive global batches. So no sample is left out: where the
dataset is not a multiple of the global batch, the batch that ends an epoch is completed from
the next epoch's order (an epoch is then a fractional number of steps). A rank then takes its
micro-batches out of each global batch. Because the loss is normalised by the global token
count, how the samples of one global batch fall across ranks and micro-batches does not change
the update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=4)  # a global batch reads at most two epochs; each step asks for the same ones
def _permutation(num_samples: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randperm(num_samples, generator=g).tolist())


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
    def steps_per_epoch(self) -> float:
        """Optimizer steps per pass over the data (fractional when the data is not a multiple of
        the global batch: the epochs run on into one another, see the module docstring)."""
        return self.num_samples / self.global_batch_size

    def steps_for_epochs(self, epochs: float) -> int:
        """The steps that read `epochs` passes over the data (the last batch completed)."""
        # rounded first: 3 * 10 / 4 must not become 7.500000000000001 -> 8 by float error alone
        return max(1, math.ceil(round(epochs * self.num_samples / self.global_batch_size, 9)))

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        return list(_permutation(self.num_samples, self.seed + epoch))

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of global batch number `step` (0-based, counting across epochs)."""
        n, g = self.num_samples, self.global_batch_size
        start = step * g
        epoch, pos = divmod(start, n)
        if not self.shuffle:
            return [(pos + i) % n for i in range(g)]
        batch = list(_permutation(n, self.seed + epoch)[pos : pos + g])
        if len(batch) < g:  # the epoch's last batch, completed from the next epoch's order
            batch += _permutation(n, self.seed + epoch + 1)[: g - len(batch)]
        return batch

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

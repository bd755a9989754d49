"""Packing: several samples per row of `max_seq_length`, with attention kept inside each sample.

A packed row is the concatenation of its samples' tokens with

- `position_ids` restarting at 0 at every sample. transformers (>= 4.53; checked against 5.24,
  `masking_utils.find_packed_sequence_indices`) turns restarting positions into a block-diagonal
  causal mask for sdpa / eager / flex attention *provided the model gets no 2-D
  `attention_mask`* (with one, even all ones, the positions are not inspected and attention
  crosses samples). So a packed batch is fed to the model as `input_ids` + `position_ids` with
  `attention_mask=None`; see `collate.model_inputs`. flash-attention takes its varlen path
  (cu_seqlens from the restarting positions) only for a batch of one row
  (`modeling_flash_attention_utils._is_packed_sequence`), so for it the collator flattens a
  packed batch into one row (`PadCollator(flatten_packed=True)`, `uses_varlen_attention`).
  The RoPE rotation is computed from the same restarted positions.
- the label of the first token of every sample set to -100: in the shifted loss that label would
  be predicted from the previous sample's last token. In an unpacked batch the first label is
  never a target either, so the token-loss sum and the target count are those of the unpacked
  samples, exactly.

Padding at the end of a packed row gets its own restarting positions (0, 1, ...) so it forms a
block of its own that no real token attends to, and labels -100.
"""
from __future__ import annotations

import bisect
from typing import Sequence

__all__ = ["pack_indices", "packed_position_ids"]


def pack_indices(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= max_len (best-fit decreasing, ties
    broken by index so the result depends only on the lengths). Samples longer than `max_len`
    are an error: truncate or drop them first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than max_seq_length {max_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            b = len(bins)
            bins.append([i])
            room = max_len - n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def packed_position_ids(lengths: Sequence[int]) -> list[int]:
    out: list[int] = []
    for n in lengths:
        out.extend(range(n))
    return out

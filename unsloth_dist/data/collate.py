"""Turn samples (dicts with `input_ids`, optional `labels` / `attention_mask`) into padded batches."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

IGNORE_INDEX = -100


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)


def check_sample(sample: Any, index: int, name: str = "train_dataset") -> None:
    if not isinstance(sample, Mapping) or "input_ids" not in sample:
        got = sorted(sample.keys()) if isinstance(sample, Mapping) else type(sample).__name__
        raise ValueError(
            f"{name}[{index}] has no 'input_ids' (got {got}); each sample must be a dict with "
            "input_ids (and optional labels, attention_mask) — tokenize the text first"
        )
    n = len(_as_list(sample["input_ids"]))
    if n < 2:
        raise ValueError(f"{name}[{index}] has {n} token(s); a causal LM sample needs at least 2")
    for key in ("labels", "attention_mask"):
        if key in sample and sample[key] is not None and len(_as_list(sample[key])) != n:
            raise ValueError(f"{name}[{index}]['{key}'] has a different length from its input_ids ({n})")


class PadCollator:
    """Right-pads to the longest sample; padded positions get attention 0 and label -100.
    Missing labels are the input ids (with attention-masked positions ignored)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(_as_list(s["input_ids"])) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(samples):
            x = _as_list(s["input_ids"])
            n = len(x)
            ids[i, :n] = torch.tensor(x)
            am = _as_list(s["attention_mask"]) if s.get("attention_mask") is not None else [1] * n
            mask[i, :n] = torch.tensor(am)
            if s.get("labels") is not None:
                labels[i, :n] = torch.tensor(_as_list(s["labels"]))
            else:
                labels[i, :n] = torch.where(mask[i, :n].bool(), ids[i, :n], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

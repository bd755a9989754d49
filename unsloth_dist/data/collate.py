"""Turn samples (dicts with `input_ids`, optional `labels` / `attention_mask` / `position_ids`) into padded batches."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

IGNORE_INDEX = -100


def _as_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):  # numpy arrays
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
    for key in ("labels", "attention_mask", "position_ids"):
        if key in sample and sample[key] is not None and len(_as_list(sample[key])) != n:
            raise ValueError(f"{name}[{index}]['{key}'] has a different length from its input_ids ({n})")


class PadCollator:
    """Right-pads to the longest sample; padded positions get attention 0 and label -100.
    Missing labels are the input ids (with attention-masked positions ignored).

    Packed samples (they carry `position_ids`, see `unsloth_dist.data.packing`) also get a
    `position_ids` tensor; the padding at the end of a row gets positions restarting at 0, so it is
    a block of its own. Feed such a batch to the model through `model_inputs` (no 2-D attention
    mask), or attention would cross the packed samples.

    `flatten_packed=True` (for flash-attention, see `uses_varlen_attention`): a packed batch comes
    out as one row holding every row's tokens end to end, without padding. transformers only takes
    the flash-attention varlen path (cu_seqlens from restarting `position_ids`) for a batch of one
    row; with several rows flash attention would run causally over each whole row."""

    def __init__(self, pad_token_id: int = 0, flatten_packed: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.flatten_packed = flatten_packed

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self.flatten_packed and any(s.get("position_ids") is not None for s in samples):
            return self._flat(samples)
        length = max(len(_as_list(s["input_ids"])) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        packed = any(s.get("position_ids") is not None for s in samples)
        positions = torch.zeros((len(samples), length), dtype=torch.long) if packed else None
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
            if positions is not None:
                if s.get("position_ids") is not None:
                    positions[i, :n] = torch.tensor(_as_list(s["position_ids"]))
                    # nothing is predicted across a packed sample's start (as in the flattened path)
                    labels[i, :n] = labels[i, :n].masked_fill(positions[i, :n] == 0, IGNORE_INDEX)
                else:
                    positions[i, :n] = torch.arange(n)
                positions[i, n:] = torch.arange(length - n)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if positions is not None:
            out["position_ids"] = positions
        return out

    def _flat(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for s in samples:
            x = torch.as_tensor(_as_list(s["input_ids"]), dtype=torch.long)
            ids.append(x)
            labels.append(torch.as_tensor(_as_list(s["labels"]), dtype=torch.long) if s.get("labels") is not None else x.clone())
            p = s.get("position_ids")
            positions.append(torch.as_tensor(_as_list(p), dtype=torch.long) if p is not None else torch.arange(len(x)))
        ids_t, labels_t, pos_t = torch.cat(ids)[None], torch.cat(labels)[None], torch.cat(positions)[None]
        labels_t = labels_t.masked_fill(pos_t == 0, IGNORE_INDEX)  # nothing is predicted across a sequence start
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": labels_t, "position_ids": pos_t}


def uses_varlen_attention(model: Any) -> bool:
    """Whether the model runs a flash-attention kernel (packed batches must then be flattened to
    one row: `PadCollator(flatten_packed=True)`)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or ""
    return "flash" in str(impl)


def is_packed(batch: Mapping[str, Any]) -> bool:
    """A batch of packed rows: it carries `position_ids` (only packed rows do)."""
    return batch.get("position_ids") is not None


def model_inputs(batch: Mapping[str, Any], device: Any = None) -> dict[str, Any]:
    """The keyword arguments to give a Hugging Face causal LM for `batch`.

    Unpacked: `input_ids` and the 2-D `attention_mask`. Packed: `input_ids` and `position_ids`
    with `attention_mask=None` -- transformers only derives the block-diagonal causal mask (sdpa,
    eager, flex) or the flash-attention varlen boundaries from restarting `position_ids` when no
    2-D mask is given; an all-ones mask would let attention cross samples."""
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    out = {"input_ids": move(batch["input_ids"])}
    if is_packed(batch):
        out["attention_mask"] = None
        out["position_ids"] = move(batch["position_ids"])
    else:
        out["attention_mask"] = move(batch["attention_mask"])
    return out


class WithLabels:
    """A user's collator whose batches may lack `labels` (e.g. transformers' DataCollatorForSeq2Seq
    over samples without labels gives ``labels=None``): they become the input ids, with
    attention-masked (padding) positions ignored -- what PadCollator does for such samples."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, samples):
        batch = self.collator(samples)
        if batch.get("labels") is None:
            if "input_ids" not in batch:
                raise ValueError(
                    f"data_collator {type(self.collator).__name__} returned no input_ids (keys "
                    f"{sorted(batch.keys())}); it must return input_ids (and labels / attention_mask)"
                )
            ids = torch.as_tensor(batch["input_ids"])
            mask = batch.get("attention_mask")
            labels = ids.clone()
            if mask is not None:
                labels[torch.as_tensor(mask) == 0] = IGNORE_INDEX
            batch["labels"] = labels
        return batch

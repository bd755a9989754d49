"""From files to the map-style datasets the Trainer consumes.

    train, eval, report = build_datasets(cfg.data, tokenizer, seed=cfg.seed)
    Trainer(model, train, eval_dataset=eval, tokenizer=tokenizer, args=cfg).train()

Rows are streamed from each source, converted by their format, rendered, tokenized and masked
(`encode.Encoder`), and written to the token cache (`cache`), by one rank only. Bad rows are
skipped and counted per source (`DataReport`); a row missing a needed field is an error naming
the file, row and field (or skipped and counted with `missing_field: skip`); a source left with no
usable row is an error. All of it happens before any process group exists.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from . import cache as C
from .collate import IGNORE_INDEX
from .config import DataConfig
from .encode import Encoded, Encoder, Skip
from .formats import Empty, MissingField, detect_format, row_to_sample
from .packing import pack_indices
from .sources import BadRow, DataError, Source, discover, is_undecodable, iter_rows
from .templates import resolve_template

__all__ = ["build_datasets", "tokenize_sources", "DataReport", "SourceReport", "TokenizedDataset", "DataError"]

logger = logging.getLogger("unsloth_dist.data")

SKIP_REASONS = ("empty", "undecodable", "invalid_json", "not_an_object", "missing_field", "too_long", "no_target")
_MAX_EXAMPLES = 5


@dataclass
class SourceReport:
    name: str
    format: str = ""
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    template_fallback: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few skipped rows, "row N: reason"

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "format", "rows", "kept", "truncated", "template_fallback",
                                               "skipped", "examples")}


@dataclass
class DataReport:
    sources: list[SourceReport]
    n_samples: int = 0  # kept samples (train + eval) of the train sources
    n_train: int = 0  # rows of the train dataset (packed rows when packing)
    n_eval: int = 0
    n_train_samples: int = 0
    n_eval_samples: int = 0
    train_tokens: int = 0
    packing_efficiency: Optional[float] = None  # real tokens / (rows x max_seq_length)
    cache_paths: list[str] = field(default_factory=list)
    cache_hit: bool = True  # this process tokenized nothing

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.sources:
            for k, v in s.skipped.items():
                total[k] = total.get(k, 0) + v
        return total

    def summary(self) -> str:
        lines = []
        for s in self.sources:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(s.skipped.items())) or "none"
            lines.append(f"{s.name} [{s.format}]: {s.rows} rows, {s.kept} kept, {s.truncated} truncated, skipped: {skipped}")
            for ex in s.examples:
                lines.append(f"    {ex}")
        eff = f", packing efficiency {self.packing_efficiency:.1%}" if self.packing_efficiency is not None else ""
        lines.append(f"train: {self.n_train} rows ({self.n_train_samples} samples, {self.train_tokens} tokens{eff}); "
                     f"eval: {self.n_eval} rows ({self.n_eval_samples} samples); "
                     f"{'read from cache' if self.cache_hit else 'tokenized'}")
        return "\n".join(lines)


class TokenizedDataset(torch.utils.data.Dataset):
    """Map-style dataset over cached samples. Item: {"input_ids", "labels"} (LongTensors), plus
    "position_ids" for packed rows (each a list of samples, positions restarting per sample, the
    first label of every sample -100)."""

    def __init__(self, entries: Sequence[C.CacheEntry], rows: Sequence[Any], packed: bool) -> None:
        self.entries = list(entries)
        self.rows = rows  # unpacked: (entry, sample) pairs; packed: lists of them
        self.packed = packed

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, ref) -> tuple[np.ndarray, np.ndarray]:
        e, i = ref
        return self.entries[e].sample(int(i))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if idx < 0:
            idx += len(self)
        if not self.packed:
            ids, trained = self._sample(self.rows[idx])
            ids_t = torch.from_numpy(ids.astype(np.int64))
            labels = torch.where(torch.from_numpy(trained.astype(bool)), ids_t, IGNORE_INDEX)
            return {"input_ids": ids_t, "labels": labels}
        parts = [self._sample(ref) for ref in self.rows[idx]]
        ids_t = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.int64))
        trained = np.concatenate([p[1] for p in parts]).astype(bool)
        pos = np.concatenate([np.arange(len(p[0])) for p in parts])
        trained[pos == 0] = False  # no token is predicted from the previous sample
        labels = torch.where(torch.from_numpy(trained), ids_t, IGNORE_INDEX)
        return {"input_ids": ids_t, "labels": labels, "position_ids": torch.from_numpy(pos.astype(np.int64))}

    def _refs(self):
        return (ref for row in self.rows for ref in (row if self.packed else [row]))

    def max_token_id(self) -> int:
        """The largest token id of the cached samples this dataset reads (-1 when there are none)."""
        used = sorted({e for e, _ in self._refs()})
        return max((int(self.entries[e]._open()[0].max()) for e in used if self.entries[e].meta["n_tokens"]), default=-1)

    def longest_sample(self) -> int:
        """The most tokens of one sample (a packed row's positions restart per sample)."""
        return max((int(self.entries[e].lengths[i]) for e, i in self._refs()), default=0)

    def sample_lengths(self) -> list[int]:
        if not self.packed:
            return [int(self.entries[e].lengths[i]) for e, i in self.rows]
        return [sum(int(self.entries[e].lengths[i]) for e, i in row) for row in self.rows]


# --------------------------------------------------------------------------- tokenization


def _peek_format(rows: Iterator, fmt: str, fields: dict, name: str) -> tuple[str, Iterator]:
    if fmt != "auto":
        return fmt, rows
    buffered = []
    for item in rows:
        buffered.append(item)
        n, row = item
        if isinstance(row, dict) and row and not all(v in (None, "", [], {}) for v in row.values()):
            return detect_format(row, fields, f"{name} row {n}"), itertools.chain(buffered, rows)
    raise DataError(f"{name}: no usable rows (the file is empty or every row is blank / unreadable)")


_WORKER_ENCODER: Optional[Encoder] = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = encoder


def _process(encoder: Encoder, fmt: str, fields: dict, row: Any) -> tuple:
    """("ok", Encoded) | ("skip", reason, detail) | ("missing", field, detail)."""
    if isinstance(row, BadRow):
        return ("skip", row.reason, row.detail)
    if is_undecodable(row):
        return ("skip", "undecodable", "")
    sample = row_to_sample(row, fmt, fields)
    if isinstance(sample, Empty):
        return ("skip", "empty", "")
    if isinstance(sample, MissingField):
        return ("missing", sample.field, sample.detail)
    try:
        out = encoder.encode(sample)
    except Exception as exc:  # the chat template refused the row (raise_exception: roles must alternate, ...)
        from jinja2 import TemplateError

        if not isinstance(exc, TemplateError):
            raise
        return ("missing", "messages", f"is refused by the chat template: {exc}")
    if isinstance(out, Skip):
        return ("skip", out.reason, "")
    return ("ok", out)


def _process_chunk(args: tuple) -> list[tuple]:
    fmt, fields, chunk = args
    return [(n, _process(_WORKER_ENCODER, fmt, fields, row)) for n, row in chunk]


def _bounded_ordered(pool: Any, jobs: Iterable, max_inflight: int) -> Iterator[tuple]:
    """Results of `_process_chunk` over `jobs`, in order, with at most `max_inflight` chunks read
    ahead (Pool.imap would read the whole input ahead of the workers)."""
    from collections import deque

    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_process_chunk, (job,)))
        if len(pending) >= max_inflight:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def _chunks(rows: Iterable, size: int) -> Iterator[list]:
    it = iter(rows)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def tokenize_sources(sources: Sequence[Source], cfg: DataConfig, tokenizer: Any, writer: C.CacheWriter) -> list[SourceReport]:
    """Stream every source through the encoder into `writer`; returns one report per source."""
    template = resolve_template(cfg.template, tokenizer)
    encoder = Encoder(tokenizer, template, completions_only=cfg.train_on_completions_only,
                      max_seq_length=cfg.max_seq_length, truncation=cfg.truncation)
    reports = []
    pool = None
    if cfg.num_proc > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(cfg.num_proc, initializer=_init_worker, initargs=(encoder,))
    try:
        for src in sources:
            rep = SourceReport(name=src.name)
            fmt, rows = _peek_format(iter_rows(src), cfg.format, cfg.fields, src.name)
            rep.format = fmt
            if pool is not None:
                jobs = ((fmt, cfg.fields, chunk) for chunk in _chunks(rows, 256))
                results = _bounded_ordered(pool, jobs, max_inflight=4 * cfg.num_proc)
            else:
                results = ((n, _process(encoder, fmt, cfg.fields, row)) for n, row in rows)
            unit = "line" if src.kind == "jsonl" else "row"
            for n, res in results:
                rep.rows += 1
                where = f"{unit} {n}"
                if res[0] == "ok":
                    enc: Encoded = res[1]
                    writer.add(enc.input_ids, enc.trained)
                    rep.kept += 1
                    rep.truncated += int(enc.truncated)
                    rep.template_fallback += int(enc.template_fallback)
                elif res[0] == "missing":
                    what = f"field {res[1]!r} is missing" if not res[2] else f"field {res[1]!r} {res[2]}"
                    if cfg.missing_field == "error":
                        raise DataError(
                            f"{src.name} {where}: {what} (format {fmt}); fix the row, map the column with data.fields, "
                            "or set data.missing_field: skip"
                        )
                    rep.skip("missing_field", where, what)
                else:
                    reason = res[1]
                    rep.skip(reason, where, res[2])
            if rep.kept == 0:
                skipped = ", ".join(f"{k} {v}" for k, v in sorted(rep.skipped.items())) or "no rows at all"
                raise DataError(
                    f"{src.name}: no usable rows ({rep.rows} read; skipped: {skipped}); "
                    + (f"first: {'; '.join(rep.examples)}. " if rep.examples else "")
                    + ("Raise data.max_seq_length or set data.truncation: right/left. " if rep.skipped.get("too_long") else "")
                )
            reports.append(rep)
    finally:
        if pool is not None:
            pool.terminate()
    return reports


def _entry_for(sources: Sequence[Source], cfg: DataConfig, tokenizer: Any) -> tuple[C.CacheEntry, list[SourceReport], bool]:
    template = None if cfg.format == "text" else resolve_template(cfg.template, tokenizer)
    parts = {
        "sources": [[s.kind, s.fingerprint(), s.split if s.kind == "saved" else ""] for s in sources],
        "tokenizer": C.tokenizer_fingerprint(tokenizer),
        "template": template,
        "format": cfg.format,
        "fields": cfg.fields,
        "max_seq_length": cfg.max_seq_length,
        "truncation": cfg.truncation,
        "completions_only": cfg.train_on_completions_only,
        "missing_field": cfg.missing_field,
    }
    key = C.cache_key(parts)
    root = Path(cfg.resolved_cache_dir)

    def build() -> Path:
        writer = C.CacheWriter(root, key)
        try:
            reports = tokenize_sources(sources, cfg, tokenizer, writer)
            return writer.commit({"reports": [r.to_dict() for r in reports], "key_parts": parts,
                                  **C.launch_stamp(), "sources": [s.name for s in sources]})
        except BaseException:
            writer.abort()
            raise

    entry, built = C.coordinate(root, key, build, reuse=cfg.use_cache, timeout_s=cfg.cache_wait_timeout_s)
    reports = [SourceReport(**{k: v for k, v in r.items()}) for r in entry.meta["reports"]]
    # a cached entry may have been built from files at other paths with the same content
    for r, s in zip(reports, sources):
        r.name = s.name
    return entry, reports, built


def build_datasets(
    data_cfg: Union[DataConfig, dict],
    tokenizer: Any,
    *,
    seed: int = 0,
    source: Any = None,
    eval_source: Any = None,
) -> tuple[TokenizedDataset, Optional[TokenizedDataset], DataReport]:
    """Tokenize (once, cached) and return (train, eval or None, report).

    `source` / `eval_source`: an in-memory `datasets.Dataset` or list of dicts used instead of
    `data_cfg.paths` / a path `eval_split`. Datasets are map-style; their items are dicts of
    LongTensors `input_ids`, `labels` (-100 = not a target) and, when packing, `position_ids`."""
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(**data_cfg)
    if tokenizer is None:
        raise DataError("build_datasets needs the model's tokenizer")
    if source is not None:
        train_sources = [Source(name="<dataset>", kind="object", obj=source)]
    elif cfg.paths:
        train_sources = discover(cfg.paths, cfg.split)
    else:
        raise DataError("no training data: set data.paths (files or folders) or pass a dataset as `source`")
    entry, reports, built = _entry_for(train_sources, cfg, tokenizer)
    entries = [entry]
    refs = [(0, i) for i in range(len(entry))]
    report = DataReport(sources=reports, n_samples=len(refs), cache_paths=[str(entry.path)], cache_hit=not built)

    eval_refs: list = []
    if eval_source is not None or isinstance(cfg.eval_split, str):
        ev_sources = ([Source(name="<eval dataset>", kind="object", obj=eval_source)] if eval_source is not None
                      else discover([cfg.eval_split], cfg.split))
        ev_entry, ev_reports, ev_built = _entry_for(ev_sources, cfg, tokenizer)
        entries.append(ev_entry)
        eval_refs = [(1, i) for i in range(len(ev_entry))]
        report.sources.extend(ev_reports)
        report.cache_paths.append(str(ev_entry.path))
        report.cache_hit = report.cache_hit and not ev_built
    elif isinstance(cfg.eval_split, float):
        n = len(refs)
        n_eval = max(1, int(round(cfg.eval_split * n)))
        if n_eval >= n:
            raise DataError(f"eval_split {cfg.eval_split} of {n} samples leaves no training samples")
        perm = np.random.default_rng(seed).permutation(n)
        held = set(perm[:n_eval].tolist())
        eval_refs = [r for r in refs if r[1] in held]
        refs = [r for r in refs if r[1] not in held]

    train = _make_dataset(entries, refs, cfg)
    evald = _make_dataset(entries, eval_refs, cfg) if eval_refs else None
    report.n_train, report.n_train_samples = len(train), len(refs)
    report.n_eval, report.n_eval_samples = (len(evald) if evald is not None else 0), len(eval_refs)
    report.train_tokens = int(sum(int(entries[e].lengths[i]) for e, i in refs))
    if cfg.packing:
        report.packing_efficiency = report.train_tokens / max(1, len(train) * cfg.max_seq_length)
    rank, _, _ = C.launch_rank()
    if rank == 0:
        logger.info("data:\n%s", report.summary())
        for s in report.sources:
            if s.skipped:
                logger.warning("%s: skipped %s", s.name, ", ".join(f"{v} {k}" for k, v in sorted(s.skipped.items())))
    return train, evald, report


def _make_dataset(entries: list[C.CacheEntry], refs: list, cfg: DataConfig) -> TokenizedDataset:
    if not cfg.packing:
        return TokenizedDataset(entries, refs, packed=False)
    lengths = [int(entries[e].lengths[i]) for e, i in refs]
    bins = pack_indices(lengths, cfg.max_seq_length)
    return TokenizedDataset(entries, [[refs[k] for k in b] for b in bins], packed=True)

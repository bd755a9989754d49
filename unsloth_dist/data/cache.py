"""The on-disk token cache and who fills it.

Layout: `<cache_dir>/<key>/` holds `tokens.bin` (int32, every kept sample's tokens end to end),
`trained.bin` (uint8, 1 = the token is a target), `offsets.bin` (int64, sample starts, n + 1) and
`meta.json` (counts, report, what the key was built from). An entry is written into a temporary
folder next to it and renamed into place, so a reader sees a complete entry or none; `meta.json`
is written last.

The key hashes the data (file contents, or a `datasets` fingerprint), the tokenizer (its
serialized vocabulary / model / pre- and post-processing, special tokens and chat template), and
every setting that changes the tokens or labels (format, field mapping, template source,
max_seq_length, truncation, completion-only masking). Packing and the eval split are applied
after loading, so they reuse the same entry.

Several ranks: exactly one rank tokenizes (global rank 0), the others wait and read.
- With a process group: rank 0 builds (or finds) the entry and broadcasts "ok" or its error;
  every rank takes part in the broadcast, so an error on rank 0 is raised on all, never a hang.
- Without one (the normal case: data is prepared before the Trainer creates the group), ranks are
  read from RANK / WORLD_SIZE; rank 0 builds, the others poll for `meta.json` (or an error marker
  that rank 0 writes when it fails) until `cache_wait_timeout_s`.
The cache folder must be one that every rank sees (one node, or a shared file system).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .sources import DataError

__all__ = ["cache_key", "tokenizer_fingerprint", "CacheWriter", "CacheEntry", "coordinate", "launch_rank"]

logger = logging.getLogger("unsloth_dist.data")
PIPELINE_VERSION = 3  # 2: exact content places for templates that are not prefix-stable; one-chat .json files; CSV chat cells; 3: chat role aliases
_PROCESS_START = time.time()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8", "surrogatepass"))
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items())).encode("utf-8", "surrogatepass"))
    extra = {
        name: str(getattr(tokenizer, name, None))
        for name in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token",
                     "padding_side", "chat_template")
    }
    extra["all_special_tokens"] = [str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])]
    h.update(json.dumps(extra, sort_keys=True).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    blob = json.dumps({"pipeline": PIPELINE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class CacheWriter:
    """Streams samples into a temporary entry folder; `commit` renames it into place."""

    def __init__(self, root: Path, key: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        self._tokens = open(self.tmp / "tokens.bin", "wb")
        self._trained = open(self.tmp / "trained.bin", "wb")
        self._offsets = [0]
        self.n_tokens = 0

    def add(self, ids: list[int], trained: list[int]) -> None:
        self._tokens.write(np.asarray(ids, dtype=np.int32).tobytes())
        self._trained.write(np.asarray(trained, dtype=np.uint8).tobytes())
        self.n_tokens += len(ids)
        self._offsets.append(self.n_tokens)

    def commit(self, meta: dict) -> Path:
        for f in (self._tokens, self._trained):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.asarray(self._offsets, dtype=np.int64).tofile(self.tmp / "offsets.bin")
        meta = dict(meta, n_samples=len(self._offsets) - 1, n_tokens=self.n_tokens)
        tmp_meta = self.tmp / "meta.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp_meta, self.tmp / "meta.json")
        final = self.root / self.key
        if final.exists():  # rebuilt on purpose (use_cache: false) or another process won the race
            trash = self.root / f".old-{self.key}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, trash)
            except OSError:
                trash = None
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(self.tmp, final)
        except OSError:
            # another process committed the same key between our check and the rename: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        return final

    def abort(self) -> None:
        for f in (self._tokens, self._trained):
            try:
                f.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class CacheEntry:
    """A committed entry, memory-mapped (nothing is read until a sample is asked for)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self._maps: Optional[tuple] = None
        self._lengths: Optional[np.ndarray] = None

    def _open(self):
        if self._maps is None:
            n_tok = self.meta["n_tokens"]
            tokens = np.memmap(self.path / "tokens.bin", dtype=np.int32, mode="r", shape=(n_tok,)) if n_tok else np.zeros(0, np.int32)
            trained = np.memmap(self.path / "trained.bin", dtype=np.uint8, mode="r", shape=(n_tok,)) if n_tok else np.zeros(0, np.uint8)
            offsets = np.fromfile(self.path / "offsets.bin", dtype=np.int64)
            self._maps = (tokens, trained, offsets)
        return self._maps

    def __getstate__(self):  # DataLoader workers re-open the maps instead of copying them
        return {"path": self.path, "meta": self.meta, "_maps": None, "_lengths": None}

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = np.diff(self._open()[2])
        return self._lengths

    def __len__(self) -> int:
        return int(self.meta["n_samples"])

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, trained, offsets = self._open()
        a, b = int(offsets[i]), int(offsets[i + 1])
        return np.asarray(tokens[a:b]), np.asarray(trained[a:b])


# --------------------------------------------------------------------------- ranks


def launch_rank() -> tuple[int, int, bool]:
    """(rank, world size, whether a process group exists)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), True
    except Exception:
        pass
    try:
        rank = int(os.environ.get("RANK", "0") or 0)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        rank, world = 0, 1
    return rank, world, False


def _launch_id() -> str:
    return "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"))


# The launcher variables above repeat across plain `torchrun` launches (run id "none", port 29500):
# an entry also records when the process that built it started, and the ranks of one launch start
# within this many seconds of each other. An entry from an earlier launch with the same variables
# counts only if the two launches started within a minute of each other.
SAME_LAUNCH_S = 60.0


def launch_stamp() -> dict:
    """What a cache entry records of the launch that built it (see `coordinate`)."""
    return {"launch_id": _launch_id(), "process_start": _PROCESS_START}


def _same_launch(info: dict) -> bool:
    try:
        return info.get("launch_id") == _launch_id() and abs(float(info["process_start"]) - _PROCESS_START) <= SAME_LAUNCH_S
    except (KeyError, TypeError, ValueError):
        return False


def coordinate(root: Path, key: str, build: Callable[[], Path], *, reuse: bool, timeout_s: float) -> tuple[CacheEntry, bool]:
    """The cache entry `key`, built by one rank only. Returns (entry, whether this process built it).
    `build()` writes and commits the entry (returning its path) or raises."""
    root = Path(root)
    final = root / key
    rank, world, has_group = launch_rank()

    def ready() -> bool:
        if not (final / "meta.json").is_file():
            return False
        if reuse:
            return True
        try:  # use_cache: false -- only an entry built by this launch counts
            return _same_launch(json.loads((final / "meta.json").read_text()))
        except (OSError, json.JSONDecodeError):
            return False

    built = False
    if has_group and world > 1:
        import torch.distributed as dist

        status: list[Any] = [None]
        if rank == 0:
            try:
                if not (reuse and ready()):
                    build()
                    built = True
                status[0] = "ok"
            except Exception as exc:  # every rank raises it, none hangs
                status[0] = f"{type(exc).__name__}: {exc}"
                dist.broadcast_object_list(status, src=0)
                raise
        dist.broadcast_object_list(status, src=0)
        if status[0] != "ok":
            raise DataError(f"rank 0 failed to prepare the data: {status[0]}")
        return CacheEntry(final), built

    error_marker = root / f"{key}.error.json"
    if rank == 0 or world <= 1:
        if error_marker.exists():
            error_marker.unlink(missing_ok=True)
        if reuse and ready():
            return CacheEntry(final), False
        try:
            build()
        except Exception as exc:
            if world > 1:
                root.mkdir(parents=True, exist_ok=True)
                tmp = root / f".{key}.error.{os.getpid()}"
                tmp.write_text(json.dumps(launch_stamp() | {"error": f"{type(exc).__name__}: {exc}",
                                                            "host": socket.gethostname()}))
                os.replace(tmp, error_marker)
            raise
        return CacheEntry(final), True

    # the other ranks wait for rank 0
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        if ready():
            return CacheEntry(final), False
        if error_marker.exists():
            try:
                info = json.loads(error_marker.read_text())
                fresh = _same_launch(info)
            except (OSError, json.JSONDecodeError):
                info, fresh = {}, False
            if fresh:
                raise DataError(f"rank 0 failed to prepare the data: {info.get('error')}")
        if time.monotonic() > deadline:
            raise DataError(
                f"rank {rank} waited {timeout_s:.0f} s for rank 0 to tokenize the data into {final} and it did not "
                "appear; is data.cache_dir on a file system every rank sees? (raise data.cache_wait_timeout_s for "
                "very large data)"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)

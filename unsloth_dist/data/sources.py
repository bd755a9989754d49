"""Data sources: find the files behind the configured paths and stream their rows.

Nothing here reads a whole file into memory: JSONL and CSV are read line by line, Parquet by
row groups (record batches), JSON arrays with an incremental decoder, saved `datasets` through
their memory-mapped Arrow files. Every row comes out with its 1-based row number so that a
report can name it. Text is decoded as UTF-8 with `surrogateescape`, so a row holding bytes that
are not UTF-8 is recognised (`is_undecodable`) and skipped instead of failing the whole file.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

__all__ = ["DataError", "Source", "BadRow", "discover", "iter_rows", "is_undecodable", "SUFFIXES"]

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """A problem with the training data, naming the file (and row, field) and what would fix it."""


@dataclass(frozen=True)
class Source:
    """One input: a file (kind jsonl/json/csv/tsv/parquet), a saved dataset folder (kind
    saved), or an in-memory object (kind object: a `datasets.Dataset` or a list of dicts)."""

    name: str  # what reports call it (the path, or "<dataset>")
    kind: str
    path: Optional[str] = None
    obj: Any = None
    split: str = "train"

    def fingerprint(self) -> str:
        """A hash of the content (files) or the `datasets` fingerprint (objects)."""
        if self.kind == "object":
            fp = getattr(self.obj, "_fingerprint", None)
            if fp:
                return f"datasets:{fp}"
            h = hashlib.blake2b(digest_size=16)
            for row in self.obj:
                h.update(json.dumps(row, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
                h.update(b"\n")
            return h.hexdigest()
        if self.kind == "saved":
            h = hashlib.blake2b(digest_size=16)
            for f in sorted(Path(self.path).rglob("*")):
                if f.is_file():
                    h.update(str(f.relative_to(self.path)).encode())
                    h.update(_file_hash(str(f)).encode())
            h.update(self.split.encode())
            return h.hexdigest()
        return _file_hash(self.path)


def _file_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BadRow:
    """A row that could not be read: why (`undecodable`, `invalid_json`, `not_an_object`) and how."""

    reason: str
    detail: str = ""


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def discover(paths: list[str], split: str = "train") -> list[Source]:
    """The sources behind `paths`, in order; folders are searched recursively (sorted)."""
    out: list[Source] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"data path {raw!r} does not exist")
        if p.is_dir():
            if _is_saved_dataset(p):
                out.append(Source(name=str(p), kind="saved", path=str(p), split=split))
                continue
            found: list[Source] = []
            saved_dirs: list[Path] = []
            for f in sorted(p.rglob("*")):
                if any(f.is_relative_to(d) for d in saved_dirs):
                    continue
                if f.is_dir() and _is_saved_dataset(f):
                    saved_dirs.append(f)
                    found.append(Source(name=str(f), kind="saved", path=str(f), split=split))
                elif f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."):
                    found.append(Source(name=str(f), kind=SUFFIXES[f.suffix.lower()], path=str(f)))
            if not found:
                raise DataError(
                    f"data folder {raw!r} holds no data files ({', '.join(sorted(SUFFIXES))}) and no saved dataset"
                )
            out.extend(found)
        else:
            kind = SUFFIXES.get(p.suffix.lower())
            if kind is None:
                raise DataError(
                    f"data file {raw!r}: unknown file type {p.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}"
                )
            out.append(Source(name=str(p), kind=kind, path=str(p)))
    return out


def is_undecodable(value: Any) -> bool:
    """True when a string in `value` (nested) holds text that is not valid Unicode (bytes that
    were not UTF-8, or lone surrogates from a JSON `\\ud800` escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True
    if isinstance(value, dict):
        return any(is_undecodable(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(is_undecodable(v) for v in value)
    return False


RowStream = Iterator[tuple[int, Union[dict, BadRow]]]


def iter_rows(src: Source) -> RowStream:
    """(row number, row) pairs; row is a dict or a BadRow. Row numbers are 1-based: the line for
    JSONL, the data row (header excluded) for CSV, the element for JSON, Parquet and datasets."""
    if src.kind == "jsonl":
        return _jsonl(src.path)
    if src.kind == "json":
        return _json(src.path)
    if src.kind in ("csv", "tsv"):
        return _csv(src.path, "\t" if src.kind == "tsv" else ",")
    if src.kind == "parquet":
        return _parquet(src.path)
    if src.kind == "saved":
        return _saved(src)
    if src.kind == "object":
        return _objects(src.obj)
    raise DataError(f"{src.name}: unknown source kind {src.kind!r}")


def _jsonl(path: str) -> RowStream:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", "surrogateescape").strip()
            if n == 1:
                line = line.lstrip("\ufeff")
            if not line:
                yield n, {}
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, BadRow("invalid_json", exc.msg)
                continue
            yield n, obj if isinstance(obj, dict) else BadRow("not_an_object", type(obj).__name__)


def _json(path: str) -> RowStream:
    """A JSON array of objects (streamed element by element), a stream of concatenated objects
    (JSON lines in a .json file), or one object whose single list-valued field holds the rows."""
    decoder = json.JSONDecoder()
    dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    with open(path, "rb") as f:
        buf = ""
        eof = False

        def fill() -> bool:
            nonlocal buf, eof
            if eof:
                return False
            chunk = f.read(1 << 20)
            if not chunk:
                eof = True
                buf += dec.decode(b"", final=True)
                return False
            buf += dec.decode(chunk)
            return True

        def skip_ws(pos: int) -> int:
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf) or not fill():
                    return pos

        def decode_at(pos: int) -> tuple[Any, int]:
            while True:
                try:
                    return decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as exc:
                    if not fill():
                        raise DataError(f"{path}: not valid JSON ({exc.msg} at character {exc.pos})") from None

        pos = skip_ws(0)
        if pos >= len(buf):
            return
        if buf[pos] == "[":
            pos = skip_ws(pos + 1)
            n = 0
            if pos < len(buf) and buf[pos] == "]":
                return
            while True:
                obj, pos = decode_at(pos)
                n += 1
                yield n, obj if isinstance(obj, dict) else BadRow("not_an_object", type(obj).__name__)
                # drop what was consumed now and then, so memory stays bounded (about one element
                # plus two chunks) without copying the buffer after every element
                if pos > 1 << 20:
                    buf, pos = buf[pos:], 0
                pos = skip_ws(pos)
                if pos >= len(buf):
                    raise DataError(f"{path}: the JSON array is not closed (file truncated?)")
                if buf[pos] == "]":
                    return
                if buf[pos] != ",":
                    raise DataError(f"{path}: expected ',' or ']' after element {n} of the JSON array")
                pos = skip_ws(pos + 1)
        elif buf[pos] == "{":
            first, pos = decode_at(pos)
            buf, pos = buf[pos:], 0
            pos = skip_ws(pos)
            if pos >= len(buf):
                # one object: the rows are its single list of objects ({"data": [...]}), or it is one row
                lists = [v for v in first.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
                # (a single chat, {"messages": [...]}, is one row, not a wrapper of its turns)
                if len(lists) == 1 and len(first) == 1 and next(iter(first)) not in ("messages", "conversations"):
                    for n, obj in enumerate(lists[0], start=1):
                        yield n, obj
                else:
                    yield 1, first
                return
            n = 1
            yield n, first
            while pos < len(buf):
                obj, pos = decode_at(pos)
                n += 1
                yield n, obj if isinstance(obj, dict) else BadRow("not_an_object", type(obj).__name__)
                if pos > 1 << 20:
                    buf, pos = buf[pos:], 0
                pos = skip_ws(pos)
        else:
            raise DataError(f"{path}: a .json data file must hold an array of objects or objects, not {buf[pos]!r}...")


def _csv(path: str, delimiter: str) -> RowStream:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for n, row in enumerate(reader, start=1):
            row = {k: v for k, v in row.items() if k is not None}
            # a cell holding JSON (a chat's messages, under any column name data.fields may map) is parsed
            for k, v in row.items():
                if isinstance(v, str) and (v.lstrip()[:2] == "[{" or (v[:1] in "[{" and k in ("messages", "conversations"))):
                    try:
                        parsed = json.loads(v)
                    except json.JSONDecodeError:
                        continue
                    if k in ("messages", "conversations") or (
                            isinstance(parsed, list) and parsed and all(isinstance(x, dict) for x in parsed)):
                        row[k] = parsed
            yield n, row


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {what} needs the `{module.split('.')[0]}` package: pip install "
                        f"{module.split('.')[0]}") from None


def _parquet(path: str) -> RowStream:
    pq = _need("pyarrow.parquet", f"the Parquet file {path}")

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid / OSError: not a Parquet file, truncated, ...
        raise DataError(f"{path}: not a readable Parquet file ({exc}); check the file (or its extension)") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _saved(src: Source) -> RowStream:
    datasets = _need("datasets", f"the saved dataset {src.path}")

    ds = datasets.load_from_disk(src.path)
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise DataError(f"{src.path}: the saved DatasetDict has no split {src.split!r} (it has {', '.join(ds)}); "
                            "set data.split")
        ds = ds[src.split]
    return _objects(ds)


def _objects(obj: Any) -> RowStream:
    for n, row in enumerate(obj, start=1):
        yield n, row if isinstance(row, dict) else BadRow("not_an_object", type(row).__name__)

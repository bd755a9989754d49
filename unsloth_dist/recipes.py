"""Model and data building shared by `examples/train.py` and `unsloth-dist train`.

A recipe YAML is a `TrainConfig`. Its `data:` section, when there is one, is the training data
(tokenized with the tokenizer of `--model`, which it then needs). Otherwise the model and data
come from `RecipeOptions`, which both entry points fill from the same command-line options
(--model, --text, --seq-len, --hidden, --layers).

Without `model` a small Llama is built from a config and trained as a byte-level language model
(one token per UTF-8 byte, so nothing is downloaded), by default on this package's own
sources. With `model` a local Hugging Face model directory and its tokenizer are loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


class RecipeError(ValueError):
    """A bad model / data option (the message names the option and the fix)."""


@dataclass
class RecipeOptions:
    model: Optional[str] = None  # local HF model directory; None = built-in byte-level Llama
    text: Optional[str] = None  # comma-separated UTF-8 files; None = this package's sources
    seq_len: int = 128
    hidden: Optional[int] = None  # the built-in model's width (None: 128); not with `model`
    layers: Optional[int] = None  # the built-in model's depth (None: 4); not with `model`

    def __post_init__(self) -> None:
        self._shape_given = [f"--{k}" for k in ("hidden", "layers") if getattr(self, k) is not None]
        self.hidden = 128 if self.hidden is None else self.hidden
        self.layers = 4 if self.layers is None else self.layers

    def check(self) -> None:
        if self.seq_len < 2:
            raise RecipeError(f"--seq-len {self.seq_len}: must be at least 2")
        if self.model is not None and self._shape_given:
            raise RecipeError(f"{' / '.join(self._shape_given)} shape the built-in model; --model {self.model!r} "
                              "brings its own config.json: drop them")
        if self.hidden < 32 or self.hidden % 32:
            raise RecipeError(f"--hidden {self.hidden}: must be a positive multiple of 32 (heads of 32)")
        if self.layers < 1:
            raise RecipeError(f"--layers {self.layers}: must be at least 1")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise RecipeError(f"--model {self.model!r} is not a Hugging Face model directory (no config.json)")
        for p in self.text_paths():
            if not p.is_file():
                raise RecipeError(f"--text file {str(p)!r} does not exist")

    def text_paths(self) -> list[Path]:
        if self.text:
            return [Path(p) for p in self.text.split(",") if p]
        return default_corpus()


def default_corpus() -> list[Path]:
    files = sorted(PACKAGE.glob("**/*.py")) + sorted((ROOT / "backends").glob("*.py")) + sorted(ROOT.glob("*.md"))
    return [f for f in files if f.is_file()]


def byte_samples(paths: list[Path], seq_len: int) -> list[dict]:
    data = b"\n".join(p.read_bytes() for p in paths)
    if len(data) < 2 * seq_len:
        raise RecipeError(f"--text has {len(data)} bytes; need at least {2 * seq_len} for --seq-len {seq_len}")
    return [{"input_ids": list(data[i : i + seq_len])} for i in range(0, len(data) - seq_len + 1, seq_len)]


def build_model(opts: RecipeOptions):
    """(model, tokenizer or None), fp32 on CPU; the backend moves and casts it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if opts.model:
        path = Path(opts.model)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=opts.hidden, intermediate_size=opts.hidden * 8 // 3,
        num_hidden_layers=opts.layers, num_attention_heads=max(1, opts.hidden // 32),
        num_key_value_heads=max(1, opts.hidden // 64), max_position_embeddings=max(opts.seq_len, 256),
    )
    return LlamaForCausalLM(cfg), None


def build_datasets(opts: RecipeOptions, tokenizer: Any = None) -> tuple[list[dict], list[dict]]:
    """(train, eval): fixed-length samples; 1/20 (at least one) held out for evaluation."""
    paths = opts.text_paths()
    if tokenizer is not None:
        text = "\n".join(p.read_text() for p in paths)
        ids = tokenizer(text)["input_ids"]
        train = [{"input_ids": ids[i : i + opts.seq_len]} for i in range(0, len(ids) - opts.seq_len + 1, opts.seq_len)]
        if len(train) < 2:
            raise RecipeError(f"--text gives {len(ids)} tokens; need at least {2 * opts.seq_len} for --seq-len {opts.seq_len}")
    else:
        train = byte_samples(paths, opts.seq_len)
    n_eval = max(1, len(train) // 20)
    return train[n_eval:], train[:n_eval]


def train_recipe(cfg, opts: RecipeOptions, echo: Callable[[str], None] = print) -> dict:
    """Build the model and data, train under `cfg`, evaluate before and after; on rank 0 print
    the summary line (`backend=... world_size=... steps=... loss a -> b  eval c -> d`).
    Returns the summary as a dict (every rank)."""
    from .trainer import Trainer

    opts.check()
    if getattr(cfg, "data", None) is not None:  # the config's data: section is the training data
        if opts.model is None:
            raise RecipeError("the config has a data: section, which is tokenized with the model's tokenizer: pass "
                              "--model <a local Hugging Face model directory> (the built-in byte-level model has none)")
        if opts.text:
            raise RecipeError("--text and the config's data: section both give the training data; keep one")
    model, tokenizer = build_model(opts)
    if getattr(cfg, "data", None) is not None:
        trainer = Trainer(model, None, args=cfg, tokenizer=tokenizer)
    else:
        train, evals = build_datasets(opts, tokenizer)
        trainer = Trainer(model, train, args=cfg, eval_dataset=evals, tokenizer=tokenizer)
    before = trainer.evaluate() if trainer.eval_dataset is not None else float("nan")
    result = trainer.train()
    after = trainer.evaluate() if trainer.eval_dataset is not None else float("nan")
    summary = {
        "backend": trainer.backend.name,
        "world_size": trainer.world_size,
        "steps": result.global_step,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "eval_before": before,
        "eval_after": after,
        "runtime_s": result.train_runtime_s,
        "backend_config": trainer.backend_cfg.model_dump(mode="json"),
        "metrics": os.path.join(cfg.output_dir, "metrics.jsonl"),
    }
    if trainer.rank == 0:
        echo(
            f"backend={summary['backend']} world_size={summary['world_size']} steps={summary['steps']} "
            f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}  eval {before:.4f} -> {after:.4f}  "
            f"({summary['runtime_s']:.1f}s)  metrics: {summary['metrics']}"
        )
        echo(f"backend_config={json.dumps(summary['backend_config'], sort_keys=True)}")
    return summary

"""`DataConfig`: the `data:` section of TrainConfig.

Every check that can fail on the user's input (a path that does not exist, an unknown template
name, a Jinja template that does not parse, an eval split out of range) runs when the config is
built, so it fails before any file is read, any tokenizer is loaded or any process group exists.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..config import ConfigError, _Strict

__all__ = ["DataConfig", "FORMATS", "TRUNCATION_POLICIES", "default_cache_dir"]

FORMATS = ("auto", "text", "instruction", "chat", "sharegpt")
TRUNCATION_POLICIES = ("drop", "right", "left")
# the canonical field names each format reads; `fields` maps them to the names in the user's files
CANONICAL_FIELDS = ("text", "instruction", "input", "output", "system", "messages", "conversations")


def default_cache_dir() -> str:
    env = os.environ.get("UNSLOTH_DIST_DATA_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unsloth_dist", "data")


class DataConfig(_Strict):
    """Where the training data lives, how it is rendered, tokenized, masked and packed.

    - `paths`: a file or folder, or a list of them. Files: `.jsonl`, `.json`, `.csv`, `.parquet`
      (also `.ndjson`, `.tsv`, `.pq`); a folder contributes every such file below it (sorted),
      and a folder written by `datasets.Dataset.save_to_disk` is read as that dataset.
    - `format`: `auto` detects it from the first row's fields: `text` (plain text, every token
      trained), `instruction` (`instruction` / optional `input` / `output` / optional `system`,
      Alpaca), `chat` (`messages`: a list of `{role, content}`; the roles `human` / `gpt` / `model` /
      `bot` read as user / assistant), `sharegpt` (`conversations`: a list of `{from, value}`,
      `human`/`gpt`/`system` mapped to user/assistant/system).
    - `template`: None uses the tokenizer's own chat template (the built-in `default` when it has
      none); otherwise a built-in name (`default`, `chatml`, `llama3`, `alpaca`) or a Jinja string.
    - `train_on_completions_only`: labels only the assistant turns (their content and the
      end-of-turn / EOS token that closes them); false trains on every token. Plain text is
      always trained on whole.
    - `truncation` for a sample longer than `max_seq_length` tokens: `drop` skips it (counted in the
      report), `right` keeps its first `max_seq_length` tokens, `left` keeps its last ones (the
      end of the conversation, so the final answer survives). A truncated sample left with no
      trained token is skipped and counted.
    - `packing`: several samples per row of `max_seq_length`; `position_ids` restart at 0 for
      every sample and attention never crosses samples.
    - `eval_split`: a fraction (0 < f < 1) of the samples held out for evaluation (drawn with the
      seed), or a path (file / folder) read as the eval set.
    """

    paths: list[str] = Field(
        default_factory=list,
        description="A data file or folder, or a list of them: `.jsonl`, `.json`, `.csv`, `.parquet` (also "
        "`.ndjson`, `.tsv`, `.pq`); a folder contributes every such file below it (sorted), and a folder "
        "written by `datasets.Dataset.save_to_disk` is read as that dataset. Every path must exist when "
        "the config is built (relative to the working directory).",
    )
    format: Literal["auto", "text", "instruction", "chat", "sharegpt"] = Field(
        "auto",
        description="How a row is read: `text` (a `text` field, every token trained), `instruction` "
        "(Alpaca: `instruction`, optional `input`, `output`, optional `system`), `chat` (`messages`: a "
        "list of `{role, content}`; roles `human` / `gpt` / `model` / `bot` read as user / assistant), `sharegpt` (`conversations`: a list of `{from, value}`). `auto` "
        "detects it from the first row's fields.",
    )
    template: Optional[str] = Field(
        None,
        description="Chat template that renders instruction / chat / sharegpt rows: a built-in name "
        "(`default`, `chatml`, `llama3`, `alpaca`) or a Jinja template string (checked to parse). Unset: "
        "the tokenizer's own chat template, or the built-in `default` when it has none. Not used with "
        "format text.",
    )
    max_seq_length: int = Field(
        2048,
        gt=1,
        description="Tokens per sample (and per packed row). Longer samples are handled by `truncation`. "
        "Activation memory grows with it.",
    )
    packing: bool = Field(
        False,
        description="Put several samples into each row of max_seq_length tokens: no padding is wasted. "
        "position_ids restart at 0 for every sample and attention never crosses samples (block-diagonal "
        "mask, or flash-attention varlen).",
    )
    train_on_completions_only: bool = Field(
        True,
        description="Put the loss on the assistant turns / outputs only (their content and the "
        "end-of-turn or EOS token that closes them); false trains on every token, prompts included. "
        "Plain text is always trained on whole.",
    )
    truncation: Literal["drop", "right", "left"] = Field(
        "drop",
        description="A sample longer than max_seq_length: `drop` skips it (counted in the report), "
        "`right` keeps its first max_seq_length tokens, `left` keeps its last ones (so the final answer "
        "survives). A truncated sample left with no trained token is skipped and counted.",
    )
    eval_split: Optional[Union[float, str]] = Field(
        None,
        description="Evaluation data: a fraction 0 < f < 1 of the samples held out (drawn with the seed), "
        "or a path (file or folder) read as the eval set. Unset: no eval set.",
    )
    # canonical field name -> the column name in the files, e.g. {"output": "response"}
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Column names of your files for the canonical fields the formats read (text, "
        "instruction, input, output, system, messages, conversations), e.g. `{output: response}`.",
    )
    # a row that lacks a field its format needs: error (naming file, row and field) or skip (counted)
    missing_field: Literal["error", "skip"] = Field(
        "error",
        description="A row that lacks a field its format needs: `error` stops with the file, row and field; "
        "`skip` leaves it out and counts it in the report.",
    )
    # the split of a saved DatasetDict to read
    split: str = Field("train", description="The split to read from a saved `DatasetDict` folder.")
    cache_dir: Optional[str] = Field(
        None,
        description="Where the tokenized cache is kept. Unset: $UNSLOTH_DIST_DATA_CACHE, else "
        "$XDG_CACHE_HOME/unsloth_dist/data (~/.cache/unsloth_dist/data). Every rank must see it (one "
        "node, or a shared file system).",
    )
    use_cache: bool = Field(
        True,
        description="Reuse a tokenized cache entry keyed by the data files, the tokenizer and the settings "
        "that change tokens or labels; false tokenizes again on every launch (still once, on rank 0).",
    )
    num_proc: int = Field(
        1, ge=1, description="Worker processes rank 0 uses to tokenize (a multiprocessing pool; 1: in-process)."
    )
    # how long ranks other than the tokenizing one wait for the cache before giving up
    cache_wait_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds the other ranks wait for rank 0 to finish the tokenized cache before giving up "
        "with an error. Raise it for very large datasets.",
    )

    def __init__(self, **data) -> None:
        # errors name the field as it is written in a config file: data.<field>
        try:
            BaseModel.__init__(self, **data)
        except ValidationError as exc:
            from ..config import format_validation_error  # config.py imports this module

            text = format_validation_error(exc, type(self))
            head, _, body = text.partition("\n  ")
            lines = [line if line.startswith("data.") else f"data.{line}" for line in body.split("\n  ")]
            raise ConfigError(head + "\n  " + "\n  ".join(lines)) from None

    @field_validator("paths", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if value is None:
            return []
        if isinstance(value, (str, os.PathLike)):
            return [os.fspath(value)]
        if isinstance(value, (list, tuple)):
            return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        return value

    @field_validator("paths")
    @classmethod
    def _paths_exist(cls, value: list[str]) -> list[str]:
        for p in value:
            if not p:
                raise ValueError("an empty path was given")
            if not Path(p).exists():
                raise ValueError(f"{p!r} does not exist (give a data file or folder; relative paths are "
                                 f"relative to the working directory {os.getcwd()!r})")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        from .templates import BUILTIN_TEMPLATES, looks_like_jinja

        if value in BUILTIN_TEMPLATES:
            return value
        if not looks_like_jinja(value):
            raise ValueError(
                f"{value!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja "
                "template string; leave it unset to use the tokenizer's chat template"
            )
        import jinja2

        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the Jinja template does not parse: {exc.message} (line {exc.lineno})") from None
        return value

    @field_validator("eval_split")
    @classmethod
    def _eval_split(cls, value):
        if value is None:
            return value
        if isinstance(value, float):
            if not 0.0 < value < 1.0:
                raise ValueError(f"a fractional eval_split must be between 0 and 1 (exclusive), got {value}")
            return value
        if not Path(value).exists():
            raise ValueError(f"{value!r} does not exist (give a fraction such as 0.05, or an eval data file/folder)")
        return value

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in CANONICAL_FIELDS:
                raise ValueError(f"{key!r} is not a field any format reads; map one of {', '.join(CANONICAL_FIELDS)}")
        return value

    @model_validator(mode="after")
    def _cross(self) -> "DataConfig":
        if self.template is not None and self.format == "text":
            raise ValueError("template is set but format is text (plain text is not rendered through a template)")
        return self

    @property
    def resolved_cache_dir(self) -> str:
        return self.cache_dir or default_cache_dir()

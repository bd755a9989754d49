"""Generate the configuration reference, docs/CONFIGURATION.md, from the pydantic models.

    python -m unsloth_dist.config_reference            # (re)write docs/CONFIGURATION.md
    python -m unsloth_dist.config_reference --check    # exit 1 if it is stale or a field lacks a description

Every field of `TrainConfig`, of each backend config in the `backend` discriminated union and of
the `data:` section (`DataConfig`, and any model nested in it) is listed with its type, default,
constraints (`gt` / `ge` / `lt` / `le`, `Literal` choices, stage-3-only options, the scheduler
names) and its `description=`. The checks that span several fields are listed with an example
that trips each one (tests/test_config_reference.py runs those examples).
"""
from __future__ import annotations

import argparse
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import config as C
from .data.config import DataConfig

__all__ = ["render", "missing_descriptions", "backend_models", "CROSS_FIELD_RULES", "DEFAULT_OUTPUT", "main"]

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md"
REGENERATE = "python -m unsloth_dist.config_reference"

# Checks that involve several fields (model validators), each with an example that trips it and a
# fragment of the message it produces. The test builds every example and expects that message.
CROSS_FIELD_RULES: list[tuple[str, dict, str]] = [
    ("`max_steps` or `num_train_epochs` must be set (`max_steps` wins when both are).",
     {}, "neither max_steps nor num_train_epochs is set"),
    ("`warmup_steps` and `warmup_ratio` are exclusive.",
     {"max_steps": 10, "warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_steps and warmup_ratio are both set"),
    ("`save_total_limit` needs `save_steps`.",
     {"max_steps": 10, "save_total_limit": 2}, "save_total_limit is set but save_steps is not"),
    ("`precision: fp16-mixed` is not offered with `backend: fsdp` (use bf16 / bf16-mixed, or a zero backend).",
     {"max_steps": 10, "precision": "fp16-mixed", "backend": "fsdp"}, "not supported with backend fsdp"),
    ("`backend.reshard_after_forward: true` contradicts `backend.sharding: grad_op` or `none`.",
     {"max_steps": 10, "backend": {"name": "fsdp", "sharding": "grad_op", "reshard_after_forward": True}},
     "contradicts backend.sharding='grad_op'"),
    ("`backend.offload_param` and the `stage3_*` options are refused below ZeRO stage 3.",
     {"max_steps": 10, "backend": {"name": "zero2", "offload_param": "cpu"}}, "only applies to ZeRO stage 3"),
    ("An unknown backend name is refused with the closest valid one.",
     {"max_steps": 10, "backend": "zero4"}, "backend 'zero4' is unknown (did you mean"),
    ("An unknown field is refused with the closest valid name and the list of valid ones.",
     {"max_steps": 10, "learnig_rate": 1e-4}, "unknown field (did you mean 'learning_rate'?)"),
    ("`data.template` does not apply to `data.format: text`.",
     {"max_steps": 10, "data": {"format": "text", "template": "chatml"}}, "template is set but format is text"),
    ("A fractional `data.eval_split` lies strictly between 0 and 1 (otherwise it is a path that must exist).",
     {"max_steps": 10, "data": {"eval_split": 1.5}}, "between 0 and 1"),
    ("`data.fields` maps only the canonical field names.",
     {"max_steps": 10, "data": {"fields": {"answer": "response"}}}, "is not a field any format reads"),
]

# Checks that need the launch (world size, GPUs); they run at start-up, before any process group.
STARTUP_CHECKS = [
    "`global_batch_size`, when set, must equal `per_device_train_batch_size x gradient_accumulation_steps x "
    "world size`; the message says which `gradient_accumulation_steps` would match.",
    "`backend: single` is refused when the launcher started several processes (unless "
    "`UNSLOTH_FORCE_SINGLE_GPU=1`).",
    "On a machine without CUDA: `precision: fp16-mixed`, `dist_backend: nccl`, `backend.cpu_offload` and the "
    "ZeRO offload options are refused.",
    "`backend.sharding: hybrid` needs a world size that is a multiple of the processes per node.",
    "With CUDA: at most one process per visible GPU on each node.",
    "`resume_from_checkpoint` refuses a checkpoint written with another global batch, `shuffle`, `seed` (when shuffling) or number of training samples, or by a run that trained other parameters (other LoRA settings, LoRA against full fine-tuning).",
]


# --------------------------------------------------------------------------- model discovery


def backend_models() -> list[tuple[tuple[str, ...], type[BaseModel]]]:
    """(backend names, config class) for each member of the backend discriminated union, in order."""
    field = C.TrainConfig.model_fields["backend"]
    out = []
    for cls in typing.get_args(field.annotation):
        names = typing.get_args(cls.model_fields["name"].annotation)
        out.append((tuple(names), cls))
    return out


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """pydantic models inside an annotation (Optional / list / dict / Union members)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(_nested_models(arg))
    return out


def _data_models() -> list[type[BaseModel]]:
    """DataConfig and every model nested in it, depth first, each once."""
    seen: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for f in model.model_fields.values():
            for sub in _nested_models(f.annotation):
                walk(sub)

    walk(DataConfig)
    return seen


def all_models() -> list[tuple[str, type[BaseModel]]]:
    """(field prefix, model) for everything the reference documents."""
    out: list[tuple[str, type[BaseModel]]] = [("", C.TrainConfig)]
    out += [("backend.", cls) for _, cls in backend_models()]
    out += [("data.", m) for m in _data_models()]
    return out


def missing_descriptions(models: Optional[Iterable[tuple[str, type[BaseModel]]]] = None) -> list[str]:
    """`Model.field` for every documented field whose description is missing or blank."""
    missing = []
    for _, model in (all_models() if models is None else models):
        for name, f in model.model_fields.items():
            if not (f.description or "").strip():
                missing.append(f"{model.__name__}.{name}")
    return missing


# --------------------------------------------------------------------------- formatting


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return "backend (below)"
        members = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in members)
        return f"{text} or null" if len(members) < len(args) else text
    if origin is list:
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {_type(args[0])} → {_type(args[1])}" if args else "mapping"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section (below)" if annotation is DataConfig else annotation.__name__
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation)


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, BaseModel) and "name" in type(v).model_fields:
        return str(v.name)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _default(f: FieldInfo) -> str:
    if f.default_factory is not None:
        return f"`{_value(f.default_factory())}`"
    if f.default is PydanticUndefined:
        return "required"
    return f"`{_value(f.default)}`"


def _constraints(model: type[BaseModel], name: str, f: FieldInfo) -> str:
    parts = []
    symbols = [(annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
               (annotated_types.Le, "le", "≤")]
    for meta in f.metadata:
        for kind, attr, sym in symbols:
            if isinstance(meta, kind):
                parts.append(f"{sym} {_value(getattr(meta, attr))}")
    if model is C.TrainConfig and name == "lr_scheduler_type":
        parts.append("one of " + ", ".join(f"`{s}`" for s in C._SCHEDULERS))
    if model is C.ZeroConfig and name in C._STAGE3_ONLY:
        parts.append("zero3 only")
    if model is C.TrainConfig and name == "backend":
        parts.append("one of " + ", ".join(f"`{n}`" for n in C.BACKEND_NAMES))
    return "; ".join(parts) or "—"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(prefix: str, model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    lines = ["| field | type | default | constraints | description |", "| --- | --- | --- | --- | --- |"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        lines.append(
            f"| `{prefix}{name}` | {_type(f.annotation)} | {_default(f)} | {_cell(_constraints(model, name, f))} "
            f"| {_cell(f.description or '')} |"
        )
    return lines


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def _example(rule: dict) -> str:
    import yaml

    if not rule:
        return "`{}` (an empty config)"
    return "`" + _cell(yaml.safe_dump(rule, default_flow_style=True, sort_keys=False, width=10**6).strip()) + "`"


# --------------------------------------------------------------------------- the document


def render() -> str:
    """The whole of docs/CONFIGURATION.md."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the pydantic models by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "A run is described by one `TrainConfig` (`unsloth_dist/config.py`). Give it as a YAML file "
        "(`unsloth-dist train configs/full_fsdp.yaml`, `Trainer(..., args=\"file.yaml\")`), as a dict or keyword "
        "arguments in Python, and change single fields with dotted overrides (`--set backend.sharding=grad_op`, "
        "`--set data.packing=true`); keyword arguments win over the file, overrides over both. Field names follow "
        "`transformers.TrainingArguments` where the meaning is the same. Every field is checked when the config "
        "is built: an unknown field, a value out of range or a contradiction is an error that names the field "
        "and the fix, before any process group or GPU is touched.",
        "",
        "```yaml",
        "backend: zero3               # a bare name takes the backend's defaults, or a mapping:",
        "# backend: {name: zero3, offload_optimizer: cpu}",
        "precision: bf16",
        "per_device_train_batch_size: 4",
        "gradient_accumulation_steps: 2",
        "max_steps: 1000",
        "data: {paths: [examples/data], packing: true}",
        "```",
        "",
        "Contents: [TrainConfig](#trainconfig) · [backend](#backend) · [data](#data) · "
        "[checks across fields](#checks-across-fields)",
        "",
        "## TrainConfig",
        "",
        _doc(C.TrainConfig),
        "",
        *_table("", C.TrainConfig),
        "",
        "## backend",
        "",
        "`backend:` is a discriminated union keyed by `name`: the name picks the config class, and only that "
        "class's fields are accepted. A bare name (`backend: fsdp`) takes that backend's defaults.",
        "",
    ]
    for names, cls in backend_models():
        title = ", ".join(f"`{n}`" for n in names)
        out += [f"### {title} ({cls.__name__})", "", _doc(cls), ""]
        out += _table("backend.", cls)
        out.append("")
    for i, model in enumerate(_data_models()):
        heading = "## data" if i == 0 else f"### {model.__name__}"
        out += [heading, ""]
        if model is DataConfig:
            out += ["The `data:` section (`DataConfig`, `unsloth_dist/data/config.py`). "
                    "When it is set and the Trainer gets no `train_dataset`, the Trainer builds the datasets from "
                    "it with the `tokenizer` it was given. Paths, templates and the eval split are checked when "
                    "the config is built, before any file is read.", ""]
        else:
            out += [_doc(model), ""]
        out += _table("data.", model)
        out.append("")
    out += [
        "## Checks across fields",
        "",
        "Checked when the config is built:",
        "",
        "| rule | example that is refused |",
        "| --- | --- |",
    ]
    for text, example, _ in CROSS_FIELD_RULES:
        out.append(f"| {_cell(text)} | {_example(example)} |")
    out += ["", "Checked at start-up, when the launch is known (still before any process group):", ""]
    out += [f"- {t}" for t in STARTUP_CHECKS]
    out.append("")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unsloth_dist.config_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is stale")
    p.add_argument("--output", "-o", default=str(DEFAULT_OUTPUT), help="the Markdown file (default: %(default)s)")
    args = p.parse_args(argv)
    missing = missing_descriptions()
    if missing:
        print("fields without a description (add description= to the Field): " + ", ".join(missing), file=sys.stderr)
        return 1
    text = render()
    path = Path(args.output)
    if args.check:
        current = path.read_text() if path.is_file() else None
        if current != text:
            what = "does not exist" if current is None else "is out of date"
            print(f"{path} {what}: run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`unsloth-dist` (also `python -m unsloth_dist`): train, launch, write launcher configs,
check the environment, plan memory.

    unsloth-dist train configs/full_ddp.yaml --set max_steps=10
    unsloth-dist launch configs/full_fsdp.yaml --nproc 8 --launcher accelerate
    unsloth-dist config accelerate --backend zero3 --num-processes 8 -o zero3.yaml
    unsloth-dist config deepspeed --stage 2 --world-size 8 -o zero2.json
    unsloth-dist env
    unsloth-dist plan --model llama-3.1-8b --gpus 8 --lora
    unsloth-dist checkpoint inspect outputs/run1
    unsloth-dist checkpoint consolidate outputs/run1/checkpoint-400 -o exported/
    unsloth-dist plot outputs/run_ddp outputs/run_fsdp -o runs.png

A user mistake (bad config, bad option, inconsistent launcher environment) prints one red
`error:` line (plus the config's field list) and exits with status 2, without a traceback.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="unsloth-dist",
    help="Fine-tune Hugging Face causal LMs on one GPU or many (single / DDP / FSDP2 / DeepSpeed ZeRO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Write launcher config files derived from a recipe (TrainConfig).", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console(highlight=False)
# tables: wide enough to read when stdout is a pipe or a log file (rich assumes 80 columns there)
wide = Console(highlight=False, width=max(shutil.get_terminal_size((150, 24)).columns, 150))
err = Console(stderr=True, highlight=False)

USER_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; printed as one red line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .distributed import LaunchError
    from .launch.accelerate_config import AccelerateLaunchError
    from .recipes import RecipeError

    return (UserError, ConfigError, LaunchError, AccelerateLaunchError, RecipeError)


def fail(message: str, code: int = USER_EXIT) -> "typer.Exit":
    first, _, rest = str(message).partition("\n")
    err.print(f"[bold red]error:[/bold red] {first}", markup=True, soft_wrap=True)
    if rest:
        err.print(rest, markup=False, soft_wrap=True)
    return typer.Exit(code)


def _check_output_dir(path: str, flag: str) -> None:
    """An output directory the command may create or write into, checked before any work."""
    dest = Path(path).expanduser()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{flag} {path!r} is a file; give a directory")
    parent = next((q for q in [dest, *dest.parents] if q.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path!r}: {parent} is not writable")


def _check_output_file(path: str, flag: str) -> Path:
    """An output file the command writes, checked before any work (not a directory, its folder writable)."""
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise UserError(f"{flag} {path!r} is a directory; give a file name")
    parent = next((q for q in dest.parents if q.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise UserError(f"{flag} {path!r}: {parent} is not a writable directory")
    return dest


class _guard:
    """Turn user-mistake exceptions into `fail` (exit 2); anything else stays a traceback."""

    def __init__(self, extra: tuple[type[BaseException], ...] = ()) -> None:
        self.extra = extra

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, _user_errors() + self.extra):
            raise fail(str(exc)) from None
        return False


def _load(config: Optional[str], overrides: List[str], backend: Optional[str] = None, **defaults):
    from .config import load_config

    kwargs = dict(defaults)
    if backend is not None:
        kwargs["backend"] = backend
    return load_config(config, overrides=overrides, **kwargs)


# --------------------------------------------------------------------------- train


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    config: str = typer.Argument(..., metavar="CONFIG.yaml", help="recipe: a TrainConfig YAML (e.g. configs/full_ddp.yaml)"),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="single | ddp | fsdp | zero1 | zero2 | zero3 | auto (overrides the recipe)"),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="dotted override, repeatable (--set backend.sharding=grad_op)"),
    model: Optional[str] = typer.Option(None, "--model", help="local Hugging Face model directory (default: a small byte-level Llama)"),
    text: Optional[str] = typer.Option(None, "--text", help="UTF-8 text file(s) to train on, comma separated (default: this package's sources)"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per sample"),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="width of the built-in model (default 128; not with --model)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="depth of the built-in model (default 4; not with --model)"),
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train in this process, under whatever launcher started it (none, torchrun, deepspeed, accelerate).

    The recipe is a TrainConfig; the model comes from --model (default: a small byte-level Llama
    built from --hidden / --layers), the data from the recipe's `data:` section (with --model's
    tokenizer) or else --text / --seq-len."""
    from .recipes import RecipeOptions, train_recipe

    # FloatingPointError: nan_policy stop, whose message names the step and the fix
    with _guard((ValueError, FloatingPointError)):
        cfg = _load(config, overrides, backend)
        opts = RecipeOptions(model=model, text=text, seq_len=seq_len, hidden=hidden, layers=layers)
        opts.check()
        train_recipe(cfg, opts, echo=lambda s: out.print(s, markup=False, soft_wrap=True))
    from .distributed import shutdown

    # the trainer and model are gone with train_recipe's frame: the ranks end together and the
    # groups are destroyed before the interpreter exits (left to the exit, gloo could abort a rank
    # with "terminate called without an active exception" after a good run: CI 2026-12-03)
    shutdown()


# --------------------------------------------------------------------------- launch


class Launcher(str, Enum):
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    accelerate = "accelerate"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": ["-h", "--help"]})
def launch(
    ctx: typer.Context,
    config: str = typer.Argument(..., metavar="CONFIG.yaml", help="recipe passed to `unsloth-dist train` in every process"),
    nproc: int = typer.Option(..., "--nproc", "-n", help="processes (GPUs) per node"),
    nnodes: int = typer.Option(1, "--nnodes", help="number of nodes"),
    node_rank: int = typer.Option(0, "--node-rank", help="this node's index (0..nnodes-1)"),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="address of node 0 (required with --nnodes > 1)"),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="port on node 0 (default: a free port on one node, 29500 on several)"),
    launcher: Launcher = typer.Option(Launcher.torchrun, "--launcher", "-l", case_sensitive=False, help="which launcher starts the processes"),
    hosts: Optional[str] = typer.Option(None, "--hosts", help="deepspeed only: comma-separated hosts; writes a hostfile and passes --hostfile"),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="backend override, forwarded to train (and used for the accelerate config)"),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="dotted override, repeatable; forwarded to train"),
    cpu: Optional[bool] = typer.Option(None, "--cpu/--gpu", help="accelerate: write use_cpu (default: --cpu when no CUDA GPU is visible)"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="where the generated accelerate config / hostfile go (default: a new temp dir)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the command (and write the generated files) without running it"),
) -> None:
    """Start `unsloth-dist train CONFIG` under torchrun, the DeepSpeed launcher or accelerate launch.

    Arguments after `--` go to `train` unchanged (e.g. `-- --model DIR --seq-len 512`).
    Several nodes: run the same command on every node with its --node-rank (torchrun, accelerate),
    or once on node 0 with --launcher deepspeed --hosts h1,h2 (DeepSpeed needs the hostfile)."""
    from .launch import commands as C
    from .launch.accelerate_config import CONFIG_PATH_VAR, write_accelerate_config

    extra = list(ctx.args)
    with _guard():
        spec = C.LaunchSpec(
            config=config, nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
            master_port=master_port, launcher=launcher.value,
            hosts=[h.strip() for h in hosts.split(",") if h.strip()] if hosts else [],
        )
        spec.check()
        cfg = _load(config, overrides, backend)  # a bad recipe fails here, before any process starts
        cfg.check_world_size(spec.world_size)
        if spec.world_size > 1 and cfg.backend.name == "single":
            raise UserError(f"backend 'single' with {spec.world_size} processes: pick ddp, fsdp or zero1/2/3 "
                            "(--backend), or --nproc 1")
        if spec.master_port is None and spec.nnodes == 1:
            spec.master_port = C.free_port()
        spec.train_args = ([f"--backend={backend}"] if backend else []) + [f"--set={o}" for o in overrides] + extra
        env = dict(os.environ)
        workdir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="unsloth-dist-launch-"))
        if spec.launcher == "torchrun":
            cmd = C.torchrun_command(spec)
        elif spec.launcher == "deepspeed":
            hostfile = None
            if spec.hosts:
                hostfile = C.write_hostfile(workdir / "hostfile", spec.hosts, spec.nproc)
                out.print(f"wrote DeepSpeed hostfile {hostfile}", markup=False)
            cmd = C.deepspeed_command(spec, hostfile=str(hostfile) if hostfile else None)
        else:
            if spec.world_size == 1:
                raise UserError("accelerate launch of one process: run `unsloth-dist train CONFIG` directly, or use --nproc 2+")
            b = cfg.backend if cfg.backend.name != "auto" else "ddp"
            use_cpu = cpu if cpu is not None else not _cuda_available()
            path = workdir / f"accelerate_{getattr(b, 'name', b)}_{spec.world_size}p.yaml"
            write_accelerate_config(
                path, cfg, b, num_processes=spec.world_size, num_machines=spec.nnodes, machine_rank=spec.node_rank,
                main_process_ip=spec.master_addr, main_process_port=spec.master_port, cpu=use_cpu,
            )
            out.print(f"wrote accelerate config {path}", markup=False)
            env[CONFIG_PATH_VAR] = str(path.resolve())
            cmd = C.accelerate_command(spec, str(path))
    out.print(shlex.join(cmd), markup=False, soft_wrap=True)
    if dry_run:
        return
    env.setdefault("PYTHONUNBUFFERED", "1")
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        err.print(f"[bold red]error:[/bold red] {spec.launcher} exited with status {rc}", markup=True)
        raise typer.Exit(rc)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- config


class AccelBackend(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"
    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"


def _recipe_with_backend(recipe: Optional[str], backend: dict | str, overrides: List[str]):
    """The recipe (or defaults) with `backend`, keeping the recipe's settings for that backend."""
    from .config import load_config, parse_backend

    base = load_config(recipe) if recipe else load_config(None, num_train_epochs=1)
    wanted = parse_backend(backend)
    if base.backend.name != wanted.name:
        base = load_config(base, backend=wanted)
    return load_config(base, overrides=overrides) if overrides else base


@config_app.command("accelerate", context_settings={"help_option_names": ["-h", "--help"]})
def config_accelerate(
    backend: AccelBackend = typer.Option(..., "--backend", "-b", case_sensitive=False, help="the backend the config launches"),
    num_processes: int = typer.Option(..., "--num-processes", help="processes on all machines together"),
    num_machines: int = typer.Option(1, "--num-machines"),
    machine_rank: int = typer.Option(0, "--machine-rank"),
    main_process_ip: Optional[str] = typer.Option(None, "--main-process-ip", help="address of machine 0 (required with several machines)"),
    main_process_port: Optional[int] = typer.Option(None, "--main-process-port"),
    cpu: bool = typer.Option(False, "--cpu", help="use_cpu: true (CPU processes with gloo; for tests)"),
    recipe: Optional[str] = typer.Option(None, "--config", "-c", help="recipe YAML the settings come from (sharding, offload, accumulation, clipping, precision)"),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="dotted override of the recipe, repeatable"),
    output: Path = typer.Option(..., "--output", "-o", help="the YAML file to write"),
) -> None:
    """Write an accelerate config file (built with accelerate's ClusterConfig) for a backend.

    Launch with `accelerate launch --config_file FILE examples/train.py` (or `-m unsloth_dist train
    RECIPE`); with backend auto the Trainer then runs exactly the backend this file describes."""
    from .launch.accelerate_config import write_accelerate_config

    with _guard():
        _check_output_file(str(output), "--output")
        cfg = _recipe_with_backend(recipe, backend.value, overrides)
        path = write_accelerate_config(
            output, cfg, cfg.backend, num_processes=num_processes, num_machines=num_machines,
            machine_rank=machine_rank, main_process_ip=main_process_ip, main_process_port=main_process_port, cpu=cpu,
        )
    out.print(f"wrote {path} (backend {cfg.backend.name}, {num_processes} processes on {num_machines} machine(s))", markup=False)


class Offload(str, Enum):
    none = "none"
    cpu = "cpu"


@config_app.command("deepspeed", context_settings={"help_option_names": ["-h", "--help"]})
def config_deepspeed(
    stage: int = typer.Option(..., "--stage", min=1, max=3, help="ZeRO stage 1, 2 or 3"),
    offload_optimizer: Optional[Offload] = typer.Option(None, "--offload-optimizer", case_sensitive=False,
                                                        help="none | cpu; unset: the recipe's (none without one)"),
    offload_param: Optional[Offload] = typer.Option(None, "--offload-param", case_sensitive=False,
                                                    help="stage 3 only; none | cpu; unset: the recipe's"),
    recipe: Optional[str] = typer.Option(None, "--config", "-c", help="recipe YAML (batch size, accumulation, clipping, precision)"),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="dotted override of the recipe, repeatable"),
    world_size: int = typer.Option(1, "--world-size", min=1, help="ranks the file is for (train_batch_size = micro x accumulation x world size)"),
    output: Path = typer.Option(..., "--output", "-o", help="the JSON file to write"),
) -> None:
    """Write the DeepSpeed JSON config that the zero backends pass to deepspeed.initialize.

    It is produced by the same function the Trainer uses (unsloth_dist.launch.deepspeed_config),
    so the file and the run cannot disagree -- except for `backend.stage3_leaf_layers`, which the zero3
    backend applies to the model itself (it needs the model's decoder layers), and an unset
    `reduce_bucket_size`, which the backend lowers to the model's trainable element count when that is
    smaller (e.g. under LoRA). DeepSpeed itself rejects the file on another world size."""
    from .launch.deepspeed_config import deepspeed_config

    with _guard():
        output = _check_output_file(str(output), "--output")
        backend = {"name": f"zero{stage}"}
        if offload_optimizer is not None:
            backend["offload_optimizer"] = offload_optimizer.value
        if offload_param is not None:
            backend["offload_param"] = offload_param.value
        cfg = _recipe_with_backend(recipe, backend, overrides)
        b = cfg.backend
        if offload_optimizer is not None or offload_param is not None:
            # the flags given win over the recipe's backend section (none included)
            from .config import load_config

            cfg = load_config(cfg, overrides=[f"backend.{k}={v}" for k, v in backend.items() if k != "name"])
            b = cfg.backend
        cfg.check_world_size(world_size)
        ds = deepspeed_config(cfg, b, world_size)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(json.dumps(ds, indent=2) + "\n")
        os.replace(tmp, output)
    out.print(f"wrote {output} (ZeRO-{b.stage}, world size {world_size}, train_batch_size {ds['train_batch_size']})", markup=False)


# --------------------------------------------------------------------------- env


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def env() -> None:
    """Check the environment: versions, GPUs, launcher variables. Exit 1 on a blocker (the fix is shown)."""
    from .launch.envcheck import BLOCKER, INFO, OK, WARN, check_environment

    rows = check_environment()
    table = Table(title="unsloth-dist environment", show_lines=False)
    for col in ("item", "value", "status", "fix"):
        table.add_column(col, overflow="fold")
    style = {OK: "green", INFO: "cyan", WARN: "yellow", BLOCKER: "bold red"}
    for r in rows:
        table.add_row(r.item, r.value, f"[{style[r.status]}]{r.status}[/{style[r.status]}]", r.fix)
    wide.print(table)
    blockers = [r for r in rows if r.status == BLOCKER]
    if blockers:
        for r in blockers:
            err.print(f"[bold red]blocker:[/bold red] {r.item}: {r.fix}", markup=True, soft_wrap=True)
        raise typer.Exit(1)


# --------------------------------------------------------------------------- plan


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def plan(
    model: str = typer.Option(..., "--model", "-m", help="preset (llama-3.2-1b, llama-3.1-8b, qwen2.5-7b, mistral-7b, ...), config.json or model dir"),
    gpus: int = typer.Option(..., "--gpus", "-g", help="number of GPUs"),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GiB per GPU"),
    lora: bool = typer.Option(False, "--lora", help="LoRA on q,k,v,o,gate,up,down (frozen base)"),
    qlora: bool = typer.Option(False, "--qlora", help="QLoRA: LoRA on a 4-bit NF4 base (load_in_4bit; the decoder layers' linears quantized)"),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank (with --lora / --qlora)"),
    seq: int = typer.Option(2048, "--seq", help="sequence length"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="micro-batch to check (default: report the largest that fits)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing/--no-gradient-checkpointing"),
    checkpoint_layers: Optional[int] = typer.Option(None, "--checkpoint-layers", help="with --gradient-checkpointing: only the first K decoder layers are checkpointed (gradient_checkpointing_layers)"),
    activation_offload: bool = typer.Option(False, "--activation-offload", help="with --gradient-checkpointing: the checkpointed layer inputs in CPU memory (activation_offload)"),
    precision: List[str] = typer.Option([], "--precision", "-p", help="bf16 | bf16-mixed | fp32, repeatable (default: all)"),
    kernels: bool = typer.Option(True, "--kernels/--no-kernels", help="the model runs unsloth_dist's kernels (FastLanguageModel / patch_model: fused cross-entropy, no logits); --no-kernels: a model as transformers built it"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Estimate per-GPU memory for every backend and precision; recommend a backend and micro-batch that fit."""
    from .launch import planner as PL

    with _guard():
        for p in precision:
            if p not in PL.PRECISIONS:
                raise UserError(f"--precision {p!r}: choose from {', '.join(PL.PRECISIONS)}")
        if lora_r < 1:
            raise UserError(f"--lora-r {lora_r}: must be at least 1")
        lora = lora or qlora
        if lora_r != 16 and not lora:
            raise UserError(f"--lora-r {lora_r} without --lora or --qlora: full fine-tuning has no adapters; add --lora (or --qlora)")
        shape = PL.resolve_model(model)
        result = PL.plan(shape, gpus, gpu_memory, precisions=tuple(precision) or PL.PRECISIONS, micro_batch=micro_batch,
                         seq=seq, lora=lora, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
                         checkpoint_layers=checkpoint_layers, activation_offload=activation_offload, kernels=kernels,
                         qlora=qlora)
    if as_json:
        out.print_json(json.dumps({
            "model": shape.name, "params": shape.params, "trainable": shape.lora_params(lora_r) if lora else shape.params,
            "rows": [r.gib() | {"max_micro_batch": result.max_micro[(r.backend, r.precision)]} for r in result.rows],
            "recommended": result.recommended.gib() if result.recommended else None, "reason": result.reason,
        }))
        if result.recommended is None:
            raise typer.Exit(1)  # as the table form: nothing fits
        return
    trainable = shape.lora_params(lora_r) if lora else shape.params
    out.print(f"[bold]{shape.name}[/bold]: {shape.params / 1e9:.3f} B params, trainable {trainable / 1e6:.1f} M; "
              f"{gpus} GPU(s) x {gpu_memory:g} GiB; seq {seq}; micro-batch {micro_batch or 1}; "
              f"gradient checkpointing {'off' if not gradient_checkpointing else 'on' if checkpoint_layers is None else f'on for the first {checkpoint_layers} of {shape.layers} layers'}"
              f"{', layer inputs offloaded to CPU' if activation_offload else ''}"
              f"; {'unsloth_dist kernels' if kernels else 'no kernels (transformers as built)'}"
              f"{'; 4-bit NF4 base (QLoRA)' if qlora else ''}")
    table = Table(title="per-GPU memory estimate (GiB): what is alive at the peak (backward, optimizer step, or setup)")
    for col in ("backend", "precision", "weights", "grads", "optim", "activ.", "other", "peak alloc", "peak in", "+ctx/frag", "fits", "max micro"):
        table.add_column(col, justify="right" if col not in ("backend", "precision") else "left")
    for r in result.rows:
        mm = result.max_micro[(r.backend, r.precision)]
        fits = r.reserved <= gpu_memory * PL.GiB
        g = lambda x: f"{x / PL.GiB:.2f}"  # noqa: E731
        table.add_row(r.backend, r.precision, g(r.weights), g(r.grads), g(r.optimizer), g(r.activations), g(r.transient),
                      g(r.allocated), r.phase, g(r.reserved), "[green]yes[/green]" if fits else "[red]no[/red]", str(mm))
    wide.print(table)
    if result.recommended:
        r = result.recommended
        out.print(f"[bold green]recommended:[/bold green] backend {r.backend}, precision {r.precision}, micro-batch "
                  f"{r.micro_batch} (~{r.reserved / PL.GiB:.1f} GiB per GPU). {result.reason}")
        if r.host_offload:
            out.print(f"activation offload: ~{r.host_offload / PL.GiB:.1f} GiB of pinned host memory per GPU (one buffer "
                      "per checkpointed layer, each layer input at the longest micro-batch rounded up to a power of two)")
    else:
        reason = result.reason.removeprefix("nothing fits: ")
        err.print(f"[bold red]nothing fits:[/bold red] {reason}")
        raise typer.Exit(1)


# --------------------------------------------------------------------------- checkpoint

ckpt_app = typer.Typer(help="Look into and convert training checkpoints.", no_args_is_help=True)
app.add_typer(ckpt_app, name="checkpoint")


def _checkpoint_dir(path: str):
    from .checkpoint import CheckpointError, read_meta, resolve

    p = Path(path).expanduser()
    if p.is_file():
        raise UserError(f"checkpoint {path!r} is a file; give a checkpoint-* directory or an output_dir")
    if not p.is_dir():
        raise UserError(f"checkpoint {path!r} does not exist; give a checkpoint-* directory or an output_dir")
    if not (p / "unsloth_checkpoint.json").is_file() and (p / "latest").is_file():
        latest = resolve("latest", str(p))  # an output_dir: its latest checkpoint
        if latest is None:
            raise UserError(f"{path!r} holds no complete checkpoint (its 'latest' names one that is gone)")
        p = latest
    try:
        return p, read_meta(p)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None


@ckpt_app.command("inspect", context_settings={"help_option_names": ["-h", "--help"]})
def checkpoint_inspect(path: str = typer.Argument(..., help="a checkpoint-* directory, or an output_dir (its latest)")) -> None:
    """Step, backend, world size, precision, losses and files of a checkpoint."""
    with _guard():
        p, meta = _checkpoint_dir(path)
    table = Table(title=f"checkpoint {p}", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    losses = meta.get("losses") or []
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    for key, value in (
        ("step", meta["step"]), ("backend", meta["backend"]), ("format", meta["format"]),
        ("world size", meta["world_size"]), ("global batch", meta["global_batch_size"]),
        ("precision", meta["precision"]), ("seed", meta["seed"]), ("saved at", meta.get("saved_at", "?")),
        ("last losses", ", ".join(f"{x:.4f}" for x in losses[-5:])), ("size", f"{size / 2**20:.1f} MiB"),
    ):
        table.add_row(key, str(value))
    wide.print(table)


@ckpt_app.command("consolidate", context_settings={"help_option_names": ["-h", "--help"]})
def checkpoint_consolidate(
    path: str = typer.Argument(..., help="a checkpoint-* directory, or an output_dir (its latest)"),
    output: str = typer.Option(..., "-o", "--output", help="directory to write model.safetensors (+ config.json) into"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16"),
) -> None:
    """Full weights of any backend's checkpoint as a Hugging Face folder (model.safetensors, config.json)."""
    from safetensors.torch import save_file

    from .checkpoint import consolidated_weights

    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    with _guard():
        if dtype not in dtypes:
            raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(dtypes)}")
        p, meta = _checkpoint_dir(path)
        _check_output_dir(output, "-o")
    import torch

    weights = consolidated_weights(p)
    peft_key = next((k for k in weights if ".lora_A." in k or ".base_layer." in k or k.startswith("base_model.model.")), None)
    if peft_key is not None:
        with _guard():
            raise UserError(
                f"{p} is a checkpoint of a LoRA run (peft parameter names such as {peft_key}): a folder of these "
                "would load as a model with freshly initialised weights. Export the adapter or the merged model "
                "from a Trainer instead: resume it (resume_from_checkpoint, max_steps = the checkpoint's step "
                f"{meta['step']}) and call unsloth_dist.models.export.save_lora_adapter / save_merged")
    target = getattr(torch, dtypes[dtype])
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    dest = Path(output)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "step": str(meta["step"]), "backend": meta["backend"]})
    os.replace(tmp, dest / "model.safetensors")
    if (p / "config.json").is_file():
        shutil.copy(p / "config.json", dest / "config.json")
    out.print(f"wrote {len(tensors)} tensors ({sum(t.numel() for t in tensors.values()):,} values, {dtype}) of step "
              f"{meta['step']} ({meta['backend']}, {meta['world_size']} ranks) to {dest / 'model.safetensors'}")


# --------------------------------------------------------------------------- plot

from .plotting import DEFAULT_METRICS as _PLOT_METRICS  # noqa: E402  (stdlib-only module: a cheap import)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def plot(
    run_dirs: List[str] = typer.Argument(..., metavar="RUN_DIR", help="runs' output_dirs (or their metrics.jsonl files); several go on one chart"),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="image to write (.png; default RUN_DIR/metrics.png for one run, ./runs.png for several)"),
    metrics: str = typer.Option(",".join(_PLOT_METRICS), "--metrics", "-m",
                                help="comma-separated panels, any numeric field of metrics.jsonl (also grad_norm, eval_loss, epoch)"),
) -> None:
    """Chart the metrics.jsonl of one or more runs: one panel per metric, one line per run (labelled with
    its backend and world size), eval loss on the loss panel, resumes marked."""
    from rich.markup import escape

    from .plotting import PlotError, plot_metrics

    notes: list[str] = []
    with _guard((PlotError,)):
        if output is None:
            if len(run_dirs) == 1:
                p = Path(run_dirs[0])
                output = (p if p.is_dir() or not p.exists() else p.parent) / "metrics.png"
            else:
                output = Path("runs.png")
        path = plot_metrics(run_dirs, output, metrics, on_note=notes.append)
    for n in notes:
        err.print(f"[yellow]note:[/yellow] {escape(n)}", markup=True, soft_wrap=True)
    out.print(f"wrote {path} ({len(run_dirs)} run(s))", markup=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

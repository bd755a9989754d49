"""Launcher command lines for `unsloth-dist launch`: torchrun, the DeepSpeed launcher and
`accelerate launch`, one node or many. Each runs `python -m unsloth_dist train CONFIG ...`
in every process.

torchrun      python -m torch.distributed.run --nproc_per_node N --nnodes M --node_rank R
              --master_addr A --master_port P -m unsloth_dist train CONFIG ...
deepspeed     deepspeed --num_gpus N --master_port P --no_local_rank --module unsloth_dist train ...
              several nodes: with --hosts a hostfile (`host slots=N` lines) and --hostfile (run it on
              node 0, DeepSpeed reaches the others over pdsh/ssh); without --hosts several
              nodes are refused (DeepSpeed reads the node list from a hostfile even with --no_ssh)
accelerate    accelerate launch --config_file F -m unsloth_dist train CONFIG ..., F generated
              from the recipe by unsloth_dist.launch.accelerate_config
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import ConfigError

LAUNCHERS = ("torchrun", "deepspeed", "accelerate")


@dataclass
class LaunchSpec:
    config: str  # the recipe YAML, passed to `train`
    nproc: int  # processes per node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    launcher: str = "torchrun"
    hosts: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)  # after CONFIG: --backend, --set, model/data options

    def check(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher {self.launcher!r} is unknown; choose one of {', '.join(LAUNCHERS)}")
        if self.nproc < 1:
            raise ConfigError(f"--nproc {self.nproc}: must be at least 1 (processes per node)")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes {self.nnodes}: must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port {self.master_port}: not a TCP port (1..65535)")
        if self.hosts:
            if self.launcher != "deepspeed":
                raise ConfigError(
                    "--hosts writes a DeepSpeed hostfile and only applies to --launcher deepspeed; "
                    f"with {self.launcher} run the command on every node with --node-rank"
                )
            if len(self.hosts) != self.nnodes:
                raise ConfigError(f"--hosts lists {len(self.hosts)} host(s) but --nnodes is {self.nnodes}; make them agree")
        if self.launcher == "deepspeed" and self.nnodes > 1 and not self.hosts:
            # DeepSpeed's runner reads the node list from a hostfile even with --no_ssh (0.19: "Num nodes
            # is >1 but no extra nodes available via hostfile"); it cannot start node by node like torchrun
            raise ConfigError(
                f"--launcher deepspeed with --nnodes {self.nnodes} needs --hosts h0,h1,... (node 0 first; it "
                "writes DeepSpeed's hostfile and starts every node over ssh from node 0), or use --launcher "
                "torchrun / accelerate on every node with --node-rank"
            )
        if self.nnodes > 1 and not self.master_addr:
            raise ConfigError(
                f"--nnodes {self.nnodes} needs --master-addr: the address of node 0 that every node can reach "
                "(e.g. --master-addr 10.0.0.1)"
            )
        if not Path(self.config).is_file():
            raise ConfigError(f"config file {self.config!r} does not exist (give a recipe YAML, e.g. configs/full_ddp.yaml)")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(spec: LaunchSpec) -> list[str]:
    return ["unsloth_dist", "train", spec.config, *spec.train_args]


def torchrun_command(spec: LaunchSpec) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(spec.nproc)]
    if spec.nnodes > 1:
        cmd += ["--nnodes", str(spec.nnodes), "--node_rank", str(spec.node_rank)]
    cmd += ["--master_addr", spec.master_addr or "127.0.0.1", "--master_port", str(spec.master_port or 29500)]
    return cmd + ["-m", *_train_cmd(spec)]


def write_hostfile(path: str | os.PathLike, hosts: list[str], slots: int) -> Path:
    """A DeepSpeed hostfile: one `hostname slots=N` line per node."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return path


def deepspeed_command(spec: LaunchSpec, hostfile: Optional[str] = None) -> list[str]:
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--num_gpus", str(spec.nproc)]
    if spec.nnodes > 1:
        cmd += ["--num_nodes", str(spec.nnodes)]
        if hostfile:
            cmd += ["--hostfile", str(hostfile)]
        else:  # (LaunchSpec.check refuses this for unsloth-dist launch; kept for a caller with its own hostfile)
            cmd += ["--no_ssh", "--node_rank", str(spec.node_rank)]
    if spec.master_addr:
        cmd += ["--master_addr", spec.master_addr]
    cmd += ["--master_port", str(spec.master_port or 29500)]
    # --no_local_rank: every rank reads LOCAL_RANK from the environment instead
    return cmd + ["--no_local_rank", "--module", *_train_cmd(spec)]


def accelerate_command(spec: LaunchSpec, config_file: str) -> list[str]:
    exe = shutil.which("accelerate")
    cmd = [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(config_file)]
    if spec.master_port is not None and spec.nnodes == 1:
        cmd += ["--main_process_port", str(spec.master_port)]
    return cmd + ["-m", *_train_cmd(spec)]

"""The launcher configs checked in under configs/, and the commands that generate them.

    python -m unsloth_dist.launch.generated      # regenerate all of them

tests/test_cli.py regenerates each into a temp dir and fails if the checked-in file differs.
"""
from __future__ import annotations

import sys
from pathlib import Path

# path under the repository root -> `unsloth-dist` arguments that write it (-o PATH appended)
GENERATED: dict[str, list[str]] = {
    "configs/accelerate/ddp.yaml": ["config", "accelerate", "--backend", "ddp", "--num-processes", "8", "--config", "configs/full_ddp.yaml"],
    "configs/accelerate/fsdp.yaml": ["config", "accelerate", "--backend", "fsdp", "--num-processes", "8", "--config", "configs/full_fsdp.yaml"],
    "configs/accelerate/zero2.yaml": ["config", "accelerate", "--backend", "zero2", "--num-processes", "8", "--config", "configs/full_zero2.yaml"],
    "configs/accelerate/zero3.yaml": ["config", "accelerate", "--backend", "zero3", "--num-processes", "8", "--config", "configs/full_zero3.yaml"],
    "configs/deepspeed/zero1.json": ["config", "deepspeed", "--stage", "1", "--world-size", "8", "--config", "configs/full_zero2.yaml"],
    "configs/deepspeed/zero2.json": ["config", "deepspeed", "--stage", "2", "--world-size", "8", "--config", "configs/full_zero2.yaml"],
    "configs/deepspeed/zero3.json": ["config", "deepspeed", "--stage", "3", "--world-size", "8", "--config", "configs/full_zero3.yaml"],
}


def command(path: str, output: str | None = None) -> list[str]:
    return [*GENERATED[path], "-o", output or path]


def regenerate(root: Path) -> None:
    import os

    from .. import cli

    cwd = os.getcwd()
    os.chdir(root)
    try:
        for path in GENERATED:
            try:
                cli.app(command(path), standalone_mode=False)
            except SystemExit as exc:  # pragma: no cover
                if exc.code:
                    raise
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    regenerate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])

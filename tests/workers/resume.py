"""Train a tiny Llama with checkpoints, or resume one, and save losses and final weights.

    [torchrun --nproc_per_node 2] tests/workers/resume.py BACKEND OUT_DIR MODE [options]

MODE:
  full                 8 steps, checkpoint every 4 (checkpoint-4, checkpoint-8)
  resume PATH          resume from PATH (a checkpoint dir or "latest") and train to step 8
  sigterm STEP RANK    send SIGTERM to rank RANK after step STEP (the run must save and stop)
  kill-in-save STEP    SIGKILL this process in the middle of the save at step STEP
  kill-rank STEP RANK  SIGKILL rank RANK after step STEP (a crashed rank)
  raise STEP RANK      rank RANK raises an exception after step STEP
  nan STEP POLICY      the loss of step STEP is NaN; nan_policy POLICY

    [torchrun --nproc_per_node 2] tests/workers/resume.py --jobs JOBS.json

runs several of these (full / resume / nan runs: the ones that end normally) one after another in
one process (one process group; every Trainer builds its own backend), so that the tests pay the
interpreter, import and process-group start-up once. JOBS.json is a list of
{"name", "backend", "out", "mode", "rest": [...], "args": {WORKER_ARGS}}. Rank 0 writes
OUT/start-NAME (the time) when a job starts and OUT/done-NAME once every rank finished it; a
failed one prints "JOB NAME FAILED" with its traceback and ends the process (the jobs after it do
not run; a launch may end on purpose with a job that kills or raises).

The global batch is 4 samples whatever the world size (gradient accumulation fills it).
"""
from __future__ import annotations

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import add_lora, ragged_dataset, tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402

GLOBAL_BATCH, STEPS = 4, 8


class AfterStep:
    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            self.fn(trainer)


def run(backend: str, out_dir: str, mode: str, rest: list[str], extra: dict) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    micro = 2  # world 2: no accumulation; world 1: accumulation 2
    args = {
        "output_dir": out_dir,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": GLOBAL_BATCH // (micro * world),
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "lr_scheduler_type": "cosine",
        "precision": "fp32",
        "seed": 3,
        "disable_tqdm": True,
        "save_steps": 4,
    }
    lora = extra.pop("lora", False)  # a peft LoRA model (tests/tiny.add_lora) instead of full fine-tuning
    args.update(extra)
    callbacks = []
    resume = None
    if mode == "resume":
        resume = rest[0]
    elif mode == "sigterm":
        step, who = int(rest[0]), int(rest[1])
        if rank == who:
            callbacks.append(AfterStep(step, lambda t: os.kill(os.getpid(), signal.SIGTERM)))
    elif mode == "kill-in-save":
        step = int(rest[0])
        args["save_steps"] = step
    elif mode == "kill-rank":
        step, who = int(rest[0]), int(rest[1])
        if rank == who:
            callbacks.append(AfterStep(step, lambda t: os.kill(os.getpid(), signal.SIGKILL)))
    elif mode == "raise":
        step, who = int(rest[0]), int(rest[1])
        if rank == who:
            def boom(t):
                raise RuntimeError(f"boom on rank {who} after step {step}")
            callbacks.append(AfterStep(step, boom))
    elif mode == "nan":
        args["nan_policy"] = rest[1]
        args["save_steps"] = None
    model = tiny_llama(seed=0)
    if lora:
        model = add_lora(model)
    if mode == "nan":
        bad_step = int(rest[0])
        state = {"step": 0}

        def poison(module, inputs, output):
            if state["step"] == bad_step - 1:
                output.logits = output.logits * float("nan")
            return output

        model.register_forward_hook(poison)
        callbacks.append(type("C", (), {"on_step_end": lambda self, t, s, l: state.update(step=s)})())
        snapshots = {}
        callbacks.append(AfterStep(bad_step - 1, lambda t: snapshots.update(before=t.full_state_dict())))
        callbacks.append(AfterStep(bad_step, lambda t: snapshots.update(after=t.full_state_dict())))
    data = ragged_dataset(n=GLOBAL_BATCH * STEPS, seed=5)
    trainer = Trainer(model, data, args=args, backend=backend, callbacks=callbacks)
    if mode == "kill-in-save":
        real = trainer.backend.save_checkpoint

        def save_then_die(path):
            real(path)
            if trainer.global_step == 2 * step:
                os.kill(os.getpid(), signal.SIGKILL)  # the state is written, the checkpoint is not finished

        trainer.backend.save_checkpoint = save_then_die
    result = trainer.train(resume_from_checkpoint=resume)
    sd = trainer.full_state_dict()
    if trainer.rank == 0:
        record = {
            "losses": result.losses,
            "start_step": result.start_step,
            "global_step": result.global_step,
            "stopped_by_signal": result.stopped_by_signal,
            "state_dict": sd,
            "world_size": trainer.world_size,
        }
        if mode == "nan":
            record.update(snapshots)
        torch.save(record, os.path.join(out_dir, f"result-{mode}.pt"))


def main() -> int:
    if sys.argv[1] != "--jobs":
        backend, out_dir, mode, *rest = sys.argv[1:]
        run(backend, out_dir, mode, rest, json.loads(os.environ.get("WORKER_ARGS", "{}")))
        return 0
    with open(sys.argv[2]) as f:
        jobs = json.load(f)
    import time

    for job in jobs:
        print(f"=== JOB {job['name']}", flush=True)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(job["out"], f"start-{job['name']}"), "w") as f:
                f.write(repr(time.time()))
        try:
            run(job["backend"], job["out"], job["mode"], list(job.get("rest", [])), dict(job.get("args", {})))
        except BaseException:
            print(f"JOB {job['name']} FAILED", flush=True)
            print(f"JOB {job['name']} FAILED", file=sys.stderr, flush=True)
            raise
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every rank finished the job before it counts as done
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(job["out"], f"done-{job['name']}"), "w") as f:
                f.write("ok")
    return 0


if __name__ == "__main__":
    rc = main()
    from unsloth_dist.distributed import shutdown

    shutdown()  # the ranks end together; the groups are destroyed before the interpreter exits
    sys.exit(rc)

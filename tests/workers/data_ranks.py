"""Two ranks prepare the same data: one tokenizes, the other waits and reads the cache; then they
train on it with DDP, and prepare again under the process group.

    torchrun --nproc_per_node 2 tests/workers/data_ranks.py TOKENIZER_DIR DATA_FILE BAD_FILE WORK_DIR

Writes WORK_DIR/rank{R}.json with, per phase, whether this rank tokenized and a digest of the
data it got, the error a bad file raised on this rank, and the training losses.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import tiny_llama  # noqa: E402

from unsloth_dist import Trainer  # noqa: E402
from unsloth_dist.data import DataConfig, DataError, build_datasets  # noqa: E402
from unsloth_dist.data.cache import tokenizer_fingerprint  # noqa: E402


def digest(ds) -> str:
    h = hashlib.sha256()
    for i in range(len(ds)):
        for k in sorted(ds[i]):
            h.update(k.encode())
            h.update(ds[i][k].numpy().tobytes())
    return h.hexdigest()


def main(tok_dir: str, data_file: str, bad_file: str, work: str) -> None:
    from transformers import AutoTokenizer

    rank = int(os.environ["RANK"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    out: dict = {"rank": rank, "tokenizer": tokenizer_fingerprint(tok)}

    # a file with no usable rows: rank 0 fails, and the other rank gets the same error (no hang)
    try:
        build_datasets(DataConfig(paths=[bad_file], cache_dir=os.path.join(work, "cache_bad"),
                                  cache_wait_timeout_s=500), tok, seed=0)
        out["bad"] = None
    except DataError as exc:
        out["bad"] = str(exc)

    # before any process group: rank 0 tokenizes, rank 1 polls for the committed entry
    cfg = DataConfig(paths=[data_file], cache_dir=os.path.join(work, "cache_a"), max_seq_length=256, packing=True,
                     eval_split=0.05, cache_wait_timeout_s=500)
    train, evald, report = build_datasets(cfg, tok, seed=0)
    out["file_mode"] = {"tokenized": not report.cache_hit, "train": digest(train), "eval": digest(evald),
                        "rows": len(train)}

    model = tiny_llama(seed=0, vocab=len(tok))
    args = {"output_dir": os.path.join(work, "out"), "per_device_train_batch_size": 2, "max_steps": 6,
            "learning_rate": 3e-3, "precision": "fp32", "seed": 1, "disable_tqdm": True, "logging_steps": 1}
    trainer = Trainer(model, train, args=args, backend="ddp", eval_dataset=evald, tokenizer=tok)
    result = trainer.train()
    out["losses"] = result.losses
    out["eval_loss"] = trainer.evaluate()

    # the process group exists now: rank 0 tokenizes, the result is broadcast
    assert torch.distributed.is_initialized()
    cfg_b = cfg.model_copy(update={"cache_dir": os.path.join(work, "cache_b")})
    train_b, _, report_b = build_datasets(cfg_b, tok, seed=0)
    out["group_mode"] = {"tokenized": not report_b.cache_hit, "train": digest(train_b)}
    # and a second time: every rank reads the cache
    _, _, report_c = build_datasets(cfg_b, tok, seed=0)
    out["group_mode_again"] = {"tokenized": not report_c.cache_hit}

    with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    # no barrier + destroy_process_group here: with DDP's reducer still holding the gloo group, torch
    # 2.13 can deadlock in the group's destructor (main thread joins gloo's worker, which waits for
    # the GIL to free the barrier's tensors) -- seen once in CI; the group is torn down at exit


if __name__ == "__main__":
    main(*sys.argv[1:5])

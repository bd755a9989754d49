"""The shipped dataset through the pipeline into `unsloth_dist.Trainer`: the loss falls."""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from data_common import SHIPPED, bpe_tokenizer  # noqa: E402
from tiny import tiny_llama  # noqa: E402

from unsloth_dist.config import ConfigError, _Strict  # noqa: E402
from unsloth_dist.data import DataConfig, build_datasets  # noqa: E402


@pytest.mark.parametrize("packing", [True, False])
def test_shipped_dataset_trains(tmp_path, packing):
    from unsloth_dist import Trainer

    tok = bpe_tokenizer()
    cfg = DataConfig(paths=[str(SHIPPED)], max_seq_length=256, packing=packing, eval_split=0.05,
                     cache_dir=str(tmp_path / "cache"))
    train, evald, report = build_datasets(cfg, tok, seed=0)
    assert report.n_samples == 480 and not report.skipped
    assert {s.format for s in report.sources} == {"chat", "instruction"}
    if packing:
        assert report.packing_efficiency > 0.9 and len(train) < report.n_train_samples
    model = tiny_llama(seed=0, vocab=len(tok))
    trainer = Trainer(model, train, eval_dataset=evald, tokenizer=tok, backend="single",
                      args={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4 if packing else 16,
                            "max_steps": 5, "learning_rate": 3e-3, "precision": "fp32", "disable_tqdm": True,
                            "seed": 0})
    before = trainer.evaluate()
    losses = trainer.train().losses
    after = trainer.evaluate()
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and after < before


def test_num_proc_gives_the_same_tokens(tmp_path):
    tok = bpe_tokenizer()
    one, _, _ = build_datasets(DataConfig(paths=[str(SHIPPED / "chat.jsonl")], cache_dir=str(tmp_path / "a")), tok)
    two, _, _ = build_datasets(DataConfig(paths=[str(SHIPPED / "chat.jsonl")], cache_dir=str(tmp_path / "b"),
                                          num_proc=2), tok)
    assert len(one) == len(two) == 160
    for i in range(len(one)):
        assert one[i]["input_ids"].tolist() == two[i]["input_ids"].tolist()
        assert one[i]["labels"].tolist() == two[i]["labels"].tolist()


def test_data_section_nests_in_a_strict_config():
    """How TrainConfig will hold it (`data: Optional[DataConfig] = None`): errors name data.<field>."""

    class Holder(_Strict):
        data: Optional[DataConfig] = None

    h = Holder(data={"paths": str(SHIPPED / "chat.jsonl"), "packing": True})
    assert isinstance(h.data, DataConfig) and h.data.paths == [str(SHIPPED / "chat.jsonl")]
    with pytest.raises(ConfigError, match=r"data\.paths: .*'nope\.jsonl' does not exist"):
        Holder(data={"paths": "nope.jsonl"})
    with pytest.raises(ConfigError, match=r"data\.truncation"):
        Holder(data={"paths": str(SHIPPED), "truncation": "middle"})


def test_trainer_builds_the_data_section_of_its_config(tmp_path):
    """TrainConfig's `data:` section: the Trainer tokenizes the files itself (before any process
    group) when no train_dataset is given, and trains on them."""
    from unsloth_dist import Trainer

    tok = bpe_tokenizer()
    args = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8, "max_steps": 3,
            "learning_rate": 3e-3, "precision": "fp32", "disable_tqdm": True,
            "data": {"paths": [str(SHIPPED / "instructions.jsonl")], "max_seq_length": 128, "eval_split": 0.1,
                     "cache_dir": str(tmp_path / "cache")}}
    trainer = Trainer(tiny_llama(seed=0, vocab=len(tok)), None, args=args, tokenizer=tok, backend="single")
    assert trainer.data_report.n_samples == 320 and len(trainer.train_dataset) + len(trainer.eval_dataset) == 320
    losses = trainer.train().losses
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    with pytest.raises(ConfigError, match="tokenizer"):
        Trainer(tiny_llama(seed=0, vocab=len(tok)), None, args=args, backend="single")
    # the tokenized samples get the checks rows in memory get, before any process group: token ids
    # past the model's vocabulary (else an IndexError / device assert at step 1) ...
    with pytest.raises(ConfigError, match=f"outside the model's vocabulary of {len(tok) - 50}"):
        Trainer(tiny_llama(seed=0, vocab=len(tok) - 50), None, args=args, tokenizer=tok, backend="single")
    # ... and samples longer than learned position embeddings (GPT-2: an IndexError at step 1)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="past the 16 positions of GPT2LMHeadModel"):
        Trainer(gpt2, None, args=args, tokenizer=tok, backend="single")


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_false_reads_the_dataset_in_order(tmp_path, shuffle):
    """`shuffle: false`: the Trainer's batches are the rows in the dataset's order, every epoch;
    `shuffle: true` (the default): each epoch is a permutation, not that order."""
    import torch

    from unsloth_dist import Trainer

    rows = [{"input_ids": [i + 1] * 4} for i in range(12)]  # row i is recognisable by its token
    trainer = Trainer(tiny_llama(seed=0, vocab=32), rows, backend="single",
                      args={"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 3, "max_steps": 8,
                            "precision": "fp32", "disable_tqdm": True, "seed": 0, "shuffle": shuffle})
    seen: list[int] = []
    real = trainer._forward_loss_sum

    def record(batch):
        seen.extend(int(r[0]) - 1 for r in batch["input_ids"])
        return real(batch)

    trainer._forward_loss_sum = record
    trainer.train()
    assert len(seen) == 24  # 8 steps x 3 rows: two epochs of 12
    assert (seen == list(range(12)) * 2) is (not shuffle)
    if shuffle:
        assert sorted(seen[:12]) == list(range(12)) and seen[:12] != seen[12:]  # a new permutation per epoch
        assert torch.equal(torch.tensor(seen[:12]), torch.randperm(12, generator=torch.Generator().manual_seed(0)))

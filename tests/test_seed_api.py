"""The seed-compatible API: UnslothTrainingArguments -> TrainConfig mapping (errors included), and the
issue's seed snippet (examples/multi_gpu_training.py) under `torchrun --nproc_per_node 2` on CPU with gloo."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from conftest import run_cmd, torchrun
from unsloth_dist.config import ConfigError
from unsloth_dist.seed_api import UnslothTrainer, UnslothTrainingArguments

ONE = {"WORLD_SIZE": "1"}
TWO = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
       "TORCHELASTIC_RUN_ID": "x"}


def cfg(environ=ONE, model=None, **kw):
    return UnslothTrainingArguments(output_dir="o", max_steps=3, **kw).to_train_config(model, environ=environ)


def test_direct_fields_and_hf_defaults():
    c = cfg(per_device_train_batch_size=3, gradient_accumulation_steps=2, learning_rate=2e-4, warmup_steps=1,
            lr_scheduler_type="cosine", weight_decay=0.01, seed=7, logging_steps=5, dataloader_pin_memory=False)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps, c.learning_rate) == (3, 2, 2e-4)
    assert (c.lr_scheduler_type, c.seed, c.logging_steps, c.dataloader_pin_memory) == ("cosine", 7, 5, False)
    assert c.backend.name == "auto" and c.precision == "fp32"
    epochs = UnslothTrainingArguments(output_dir="o").to_train_config(environ=ONE)
    assert epochs.max_steps is None and epochs.num_train_epochs == 3.0  # transformers' default
    assert UnslothTrainingArguments(max_steps=-1, num_train_epochs=1).to_train_config(environ=ONE).max_steps is None


def test_precision_mapping():
    assert cfg(bf16=True).precision == "bf16-mixed"
    assert cfg(fp16=True).precision == "fp16-mixed"
    assert cfg(bf16=False, fp16=False).precision == "fp32"
    assert cfg(precision="bf16").precision == "bf16"
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert cfg(model=half).precision == "bf16"  # a bf16 model is neither trained in fp32 nor upcast
    assert cfg(model=half, bf16=True).precision == "bf16"  # (bf16-mixed would upcast its weights)
    assert cfg(model=torch.nn.Linear(2, 2)).precision == "fp32"
    with pytest.raises(ConfigError, match="both set"):
        cfg(bf16=True, fp16=True)


def test_distributed_options():
    c = cfg(environ=TWO, distributed_backend="gloo", ddp_find_unused_parameters=True, ddp_bucket_cap_mb=10)
    assert c.dist_backend == "gloo"
    assert c.backend.name == "ddp" and c.backend.find_unused_parameters and c.backend.bucket_cap_mb == 10
    c = cfg(environ=TWO, backend="ddp", ddp_bucket_cap_mb=5)
    assert c.backend.bucket_cap_mb == 5
    with pytest.warns(UserWarning, match="ddp backend only"):
        c = cfg(environ=TWO, backend="zero3", ddp_bucket_cap_mb=5)
    assert c.backend.name == "zero3"
    assert cfg(environ=TWO, backend="fsdp").backend.name == "fsdp"
    with pytest.raises(ConfigError, match="distributed_backend"):
        cfg(distributed_backend="mpi")


def test_enable_distributed_training_false():
    assert cfg(enable_distributed_training=False).backend.name == "single"
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        cfg(environ=TWO, enable_distributed_training=False)
    with pytest.raises(ConfigError, match="contradicts backend"):
        cfg(enable_distributed_training=False, backend="fsdp")


def test_optim_and_ignored_and_unknown_arguments():
    assert cfg(optim="adamw_torch_fused").precision == "fp32"
    with pytest.warns(UserWarning, match="torch AdamW"):
        cfg(optim="adamw_8bit")
    with pytest.raises(ConfigError, match="optim='sgd' is not supported"):
        cfg(optim="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg(report_to="none")  # the harmless default: silent
    with pytest.warns(UserWarning, match="logging_dir"):
        cfg(logging_dir="logs")
    # TensorBoard / W&B pass through to TrainConfig; integrations unsloth_dist lacks are dropped loudly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = cfg(report_to="wandb", run_name="exp1")
    assert c.report_to == ["wandb"] and c.run_name == "exp1"
    with pytest.warns(UserWarning, match="report_to=.*ignoring \\['mlflow'\\]"):
        assert cfg(report_to=["tensorboard", "mlflow"]).report_to == ["tensorboard"]
    assert cfg(report_to="none").report_to == []
    with pytest.raises(ConfigError, match=r"'learnin_rate' \(did you mean 'learning_rate'\?\)"):
        UnslothTrainingArguments(learnin_rate=1e-3)
    with pytest.raises(ConfigError, match="backend='zero1'"):
        UnslothTrainingArguments(deepspeed="ds.json")
    with pytest.raises(ConfigError, match="eval_strategy='epoch'"):
        UnslothTrainingArguments(eval_strategy="epoch")
    with pytest.raises(ConfigError, match="ratio"):
        UnslothTrainingArguments(save_steps=0.1)
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        cfg(per_device_train_batch_size=0)  # TrainConfig's own validation still applies
    args = UnslothTrainingArguments(output_dir="x", bf16=True)
    assert args.output_dir == "x" and args.bf16 is True and args.fp16 is False and args.learning_rate == 5e-5


def test_trainer_single_process_text_dataset_evaluate_and_save(tmp_path):
    sys.path.insert(0, "tests/workers")
    from datasets import Dataset
    from models_common import make_model_dir, text_dataset

    from unsloth_dist.models.loader import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(make_model_dir(tmp_path / "m"), max_seq_length=32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    args = UnslothTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                                    per_device_eval_batch_size=2, learning_rate=1e-2, disable_tqdm=True,
                                    dataset_text_field="text")
    with pytest.warns(UserWarning, match="'peft_config' has no effect"):
        trainer = UnslothTrainer(model=model, args=args, train_dataset=Dataset.from_list(text_dataset(8)),
                                 eval_dataset=text_dataset(3, seed=1), processing_class=tok, peft_config=object())
    out = trainer.train()
    assert out.global_step == 3 and out.training_loss > 0 and out.metrics["train_loss"] == out.training_loss
    step, loss, metrics = out  # unpacks like transformers' TrainOutput
    ev = trainer.evaluate()
    assert set(ev) == {"eval_loss"} and ev["eval_loss"] > 0
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert trainer.model is model
    with pytest.raises(ValueError, match="no tokenizer was given"):
        UnslothTrainer(model=model, args=args, train_dataset=text_dataset(4))


@pytest.mark.slow
def test_seed_snippet_under_torchrun(tmp_path, ):
    sys.path.insert(0, "tests/workers")
    from models_common import make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    run_cmd(torchrun(2, "examples/multi_gpu_training.py", "--model", model_dir, "--out", str(out), "--lora"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "ddp" and summary["dist_backend"] == "gloo"
    assert summary["global_step"] == 5 and len(summary["losses"]) == 5
    assert summary["precision"] == "fp32"  # an fp32 model on the CPU
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5  # rank 0 logs alone


def test_warmup_steps_below_one_is_a_ratio_and_embedding_lr_is_refused_by_name():
    # transformers 5 spells a warmup ratio as a float warmup_steps < 1
    cfg = UnslothTrainingArguments(max_steps=10, warmup_steps=0.1).to_train_config()
    assert cfg.warmup_ratio == 0.1 and not cfg.warmup_steps
    assert UnslothTrainingArguments(max_steps=10, warmup_steps=5.0).to_train_config().warmup_steps == 5
    with pytest.raises(ConfigError, match="warmup_steps as a ratio and warmup_ratio"):
        UnslothTrainingArguments(max_steps=10, warmup_steps=0.1, warmup_ratio=0.2)
    # unsloth's continued-pretraining argument: refused by name, not as a typo of learning_rate
    with pytest.raises(ConfigError, match="embedding_learning_rate .* is not supported") as err:
        UnslothTrainingArguments(max_steps=10, embedding_learning_rate=5e-6)
    assert "did you mean" not in str(err.value)


def test_sft_style_trainer_arguments_and_state(tmp_path):
    """What TRL SFTTrainer notebooks pass to the trainer itself: dataset_text_field, max_seq_length,
    formatting_func; and trainer.state.log_history after train()."""
    sys.path.insert(0, "tests/workers")
    from models_common import make_model_dir, text_dataset

    from unsloth_dist.models.loader import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(make_model_dir(tmp_path / "m"), max_seq_length=32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    rows = [{"content": r["text"] * 3} for r in text_dataset(8)]  # long enough to be cut at 8 tokens
    args = UnslothTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                    logging_steps=1, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted, not "has no effect"
        trainer = UnslothTrainer(model=model, args=args, train_dataset=rows, tokenizer=tok,
                                 dataset_text_field="content", max_seq_length=8)
    assert len(trainer.trainer.train_dataset[0]["input_ids"]) == 8
    trainer.train()
    hist = trainer.state.log_history
    assert [h["step"] for h in hist if "loss" in h] == [1, 2] and all("learning_rate" in h for h in hist if "loss" in h)
    assert trainer.state.global_step == 2 and trainer.state.max_steps == 2 and len(trainer.state.losses) == 2
    # formatting_func: one example -> its text
    fmt = UnslothTrainer(model=model, args=args, train_dataset=[{"q": "a b", "a": "c d"}] * 4, tokenizer=tok,
                         formatting_func=lambda ex: f"Q: {ex['q']} A: {ex['a']}")
    assert fmt.trainer.train_dataset[0]["input_ids"] == tok("Q: a b A: c d", truncation=True, max_length=32)["input_ids"]
    with pytest.raises(TypeError, match="formatting_func returned dict"):
        UnslothTrainer(model=model, args=args, train_dataset=[{"q": "a"}] * 4, tokenizer=tok, formatting_func=lambda ex: ex)


def test_a_bf16_loaded_lora_base_is_not_upcast(tmp_path):
    """bf16=True (or nothing) on a bf16-loaded model: precision bf16, the frozen base keeps its bf16
    weights (bf16-mixed upcast all of them to fp32: twice the memory of the base)."""
    sys.path.insert(0, "tests/workers")
    from models_common import make_model_dir, text_dataset

    from unsloth_dist.models.loader import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(make_model_dir(tmp_path / "m"), max_seq_length=32, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    args = UnslothTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                    disable_tqdm=True, bf16=True)
    trainer = UnslothTrainer(model=model, args=args, train_dataset=text_dataset(4), tokenizer=tok)
    assert trainer.config.precision == "bf16"
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert trainer.train().global_step == 1


def test_notebook_imports():
    from unsloth_dist import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, is_bfloat16_supported  # noqa: F401

    assert is_bfloat16_supported() is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_save_strategy_steps_without_save_steps_saves_every_500():
    assert cfg(save_strategy="steps").save_steps == 500  # transformers' default
    assert cfg(save_strategy="steps", save_steps=20).save_steps == 20
    assert cfg(save_strategy="no", save_steps=20).save_steps is None

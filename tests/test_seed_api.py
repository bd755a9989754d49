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
    assert {"eval_loss", "eval_runtime", "eval_samples_per_second", "epoch"} <= set(ev) and ev["eval_loss"] > 0
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
    assert fmt.trainer.train_dataset[0]["input_ids"] == tok("Q: a b A: c d", truncation=True, max_length=32)["input_ids"] \
        + [tok.eos_token_id]  # EOS-terminated, as TRL's SFTTrainer
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


def test_transformers_argument_attributes_and_defaults(monkeypatch):
    """What transformers scripts read from their TrainingArguments, and its defaults: save every 500
    steps, eval_strategy "steps" falling back to logging_steps, num_train_epochs 3.0; transformers' default
    dataloader_drop_last=False and TRL's harmless dataset options do not warn, True says what happens
    instead (was: a warning for True, the value the sampler then followed); warnings from rank 0 only."""
    a = UnslothTrainingArguments(output_dir="o")
    assert (a.local_rank, a.process_index, a.world_size, a.should_save) == (-1, 0, 1, True)
    assert (a.save_strategy, a.eval_strategy, a.num_train_epochs, a.save_steps, a.max_steps) == ("steps", "no", 3.0, 500, -1)
    assert UnslothTrainingArguments(eval_steps=7).eval_strategy == "steps"
    for k, v in {**TWO, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert (a.local_rank, a.process_index, a.local_process_index, a.world_size, a.should_save) == (1, 1, 1, 2, False)
    monkeypatch.undo()
    # transformers' save defaults: save_total_limit alone is valid; save_strategy "no" turns saving off
    c = cfg(save_total_limit=2)
    assert (c.save_steps, c.save_total_limit) == (500, 2) and cfg().save_steps == 500
    assert cfg(save_strategy="no", save_total_limit=2).save_steps is None
    # eval_strategy "steps" without eval_steps: every logging_steps (transformers)
    assert cfg(eval_strategy="steps", logging_steps=5).eval_steps == 5
    assert cfg(eval_strategy="steps").eval_steps == cfg().logging_steps
    assert UnslothTrainingArguments(eval_strategy="steps", logging_steps=4).eval_steps == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg(dataloader_drop_last=False, packing=False, dataset_num_proc=4, local_rank=0)
        cfg(environ={**TWO, "RANK": "1"}, logging_dir="logs", backend="zero3", ddp_bucket_cap_mb=5)  # rank 1: silent
    with pytest.warns(UserWarning, match="packing=True"):
        cfg(packing=True)
    with pytest.warns(UserWarning, match="dataloader_drop_last=True is ignored: unsloth_dist drops no sample"):
        cfg(dataloader_drop_last=True)


def test_trainer_transformers_surface(tmp_path):
    """UnslothTrainer as transformers / TRL code uses it: TRL's positional order, trainer.state before
    train(), is_world_process_zero(), EOS-terminated text (TRL), every text row checked up front,
    unknown train() / evaluate() keywords refused, resume_from_checkpoint=True without a checkpoint,
    TrainOutput a NamedTuple, evaluate(metric_key_prefix=) into log_history, no warning for harmless
    SFTTrainer keywords, max_seq_length / max_length agreeing."""
    sys.path.insert(0, "tests/workers")
    from datasets import Dataset
    from models_common import make_model_dir, text_dataset

    from unsloth_dist.models.loader import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(make_model_dir(tmp_path / "m"), max_seq_length=32, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    args = UnslothTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                    per_device_eval_batch_size=2, logging_steps=1, disable_tqdm=True)
    bad = text_dataset(16)
    bad[11]["text"] = None
    for rows in (bad, Dataset.from_list(bad)):
        with pytest.raises(ValueError, match=r"train_dataset\[11\]\['text'\] is None"):
            UnslothTrainer(model=model, args=args, train_dataset=rows, tokenizer=tok)
    with pytest.raises(ValueError, match="max_seq_length=8 and max_length=16 differ"):
        UnslothTrainer(model=model, args=args, train_dataset=text_dataset(8), tokenizer=tok, max_seq_length=8,
                       max_length=16)
    with pytest.warns(UserWarning, match="packing=True"):
        UnslothTrainer(model=model, args=args, train_dataset=text_dataset(8), tokenizer=tok, packing=True)
    off = UnslothTrainer(model=model, args=args, train_dataset=text_dataset(8), tokenizer=tok, add_eos_token=False)
    assert off.trainer.train_dataset[0]["input_ids"][-1] != tok.eos_token_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # TRL's order: (model, args, data_collator, train_dataset, eval_dataset, processing_class)
        tr = UnslothTrainer(model, args, None, text_dataset(8), text_dataset(4, seed=1), tok, packing=False,
                            dataset_num_proc=2, max_seq_length=32, max_length=32)
    assert not [str(w.message) for w in caught if "UnslothTrainer" in str(w.message)]
    sample = tr.trainer.train_dataset[0]["input_ids"]
    assert sample[-1] == tok.eos_token_id and sample[:-1] == tok(text_dataset(8)[0]["text"])["input_ids"]
    assert tr.state.global_step == 0 and tr.state.log_history == [] and tr.state.epoch is None
    assert tr.is_world_process_zero() and tr.is_local_process_zero() and tr.state.is_world_process_zero
    with pytest.raises(TypeError, match="'resume_from_checkpiont' \\(did you mean 'resume_from_checkpoint'\\?\\)"):
        tr.train(resume_from_checkpiont=True)
    with pytest.raises(TypeError, match="'metric_prefix'"):
        tr.evaluate(metric_prefix="test")
    with pytest.raises(ValueError, match="No valid checkpoint found in output directory"):
        tr.train(resume_from_checkpoint=True)
    assert tr.state.global_step == 0  # nothing trained
    out = tr.train()
    assert isinstance(out, tuple) and out[0] == out.global_step == 2 and out._asdict()["training_loss"] == out[1]
    assert [h["step"] for h in tr.state.log_history if "loss" in h] == [1, 2]
    ev = tr.evaluate(metric_key_prefix="test")
    assert ev["test_loss"] > 0 and "eval_loss" not in ev
    assert tr.state.log_history[-1]["test_loss"] == ev["test_loss"] and tr.state.log_history[-1]["step"] == 2
    assert "epoch" in tr.state.log_history[-1]


_RANK0_SAVE_WORKER = r'''
import json, os, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "tests", "workers"))
from models_common import text_dataset
from unsloth_dist import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments

model_dir, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
rec = {}


def lora():
    model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=32, load_in_4bit=False)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8), tok


def trainer(model, tok, backend, timeout):
    args = UnslothTrainingArguments(output_dir=os.path.join(out, backend), per_device_train_batch_size=2, max_steps=2,
                                    logging_steps=1, disable_tqdm=True, backend=backend, ddp_timeout=timeout)
    tr = UnslothTrainer(model=model, args=args, train_dataset=text_dataset(8), tokenizer=tok)
    tr.train()
    return tr


model, tok = lora()
tr = trainer(model, tok, "ddp", 60)
a = tr.args
rec.update(process_index=a.process_index, local_rank=a.local_rank, world_size=a.world_size,
           zero=tr.is_world_process_zero(), local_zero=tr.is_local_process_zero(), history=len(tr.state.log_history))
t = time.perf_counter()
if tr.is_world_process_zero():  # the transformers idiom: rank 0 alone, no collective (ddp: whole weights)
    tr.save_model(os.path.join(out, "ddp-final"))
    model.save_pretrained_merged(os.path.join(out, "ddp-merged"), tok, save_method="merged_16bit")
rec["ddp_save_s"] = time.perf_counter() - t
tr.save_model(os.path.join(out, "ddp-all"))  # every rank: each may read the export right after
rec["sees_export"] = os.path.isfile(os.path.join(out, "ddp-all", "adapter_model.safetensors"))
model2, tok2 = lora()
tr2 = trainer(model2, tok2, "fsdp", 5)
tr2.save_model(os.path.join(out, "fsdp-final"))  # every rank: the shards are gathered
if rank == 0:  # rank 0 alone under fsdp: a clear error after a bounded wait, not a hang
    t = time.perf_counter()
    try:
        tr2.save_model(os.path.join(out, "fsdp-rank0"))
        rec["fsdp_rank0"] = "returned"
    except RuntimeError as exc:
        rec["fsdp_rank0"] = str(exc)
    rec["fsdp_rank0_s"] = time.perf_counter() - t
else:
    time.sleep(9)  # (no collective while rank 0 waits for it)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(rec, f)
sys.stdout.flush()
os._exit(0)  # the process group is left out of step by rank 0's lone call: no teardown through it
'''


@pytest.mark.slow
def test_rank0_only_save_under_torchrun(tmp_path):
    """2 ranks: after ddp training `if trainer.is_world_process_zero(): trainer.save_model()` (and
    model.save_pretrained_merged) on rank 0 alone writes at once (it waited in a collective until the
    process-group timeout); under fsdp the same guard is a clear error saying to call it on every rank.
    args.process_index / local_rank / world_size and is_world_process_zero() come from the launch."""
    sys.path.insert(0, "tests/workers")
    from models_common import make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    script = tmp_path / "worker.py"
    script.write_text(_RANK0_SAVE_WORKER)
    out = tmp_path / "out"
    run_cmd(torchrun(2, str(script), model_dir, str(out)), timeout=300)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["process_index"], r0["local_rank"], r0["world_size"], r0["zero"]) == (0, 0, 2, True)
    assert (r1["process_index"], r1["local_rank"], r1["world_size"], r1["zero"], r1["local_zero"]) == (1, 1, 2, False, False)
    assert r0["history"] == r1["history"] == 2  # log_history fills on every rank
    assert r0["ddp_save_s"] < 30, r0
    assert r0["sees_export"] and r1["sees_export"]  # called on every rank: rank 1 returned after rank 0 wrote
    assert (out / "ddp-final" / "adapter_model.safetensors").is_file()
    assert (out / "ddp-merged" / "model.safetensors").is_file() and (out / "ddp-merged" / "tokenizer.json").is_file()
    assert (out / "fsdp-final" / "adapter_model.safetensors").is_file()
    assert "every rank must call it" in r0["fsdp_rank0"] and r0["fsdp_rank0_s"] < 30, r0
    assert not (out / "fsdp-rank0").exists()


def test_pre_tokenized_rows_are_cut_to_max_seq_length():
    # TRL's SFTTrainer truncates tokenized rows to max_length; they went through whole
    from unsloth_dist.seed_api import _prepare_dataset

    rows = [{"input_ids": list(range(1, 21)), "labels": list(range(1, 21)), "extra": "x"}]
    ds = _prepare_dataset(rows, None, 8, "text", "train_dataset")
    assert ds[0] == {"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}

"""Export details that need no second process: dtype of the merged export, atomic replacement of an
existing export, full fine-tuning (no peft), tied embeddings, modules_to_save, errors. The round trips
after training under every backend (ZeRO-3 and FSDP2 included) are in tests/test_models_backends.py."""
from __future__ import annotations

import json
import sys

import pytest
import torch

sys.path.insert(0, "tests/workers")
from models_common import make_model_dir  # noqa: E402

from unsloth_dist.models.export import save_lora_adapter, save_merged  # noqa: E402

IDS = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33]])


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm.eval()


def test_merged_bf16_tied_embeddings_and_modules_to_save(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = make_model_dir(tmp_path / "tied", tie=True)
    pm = _lora(AutoModelForCausalLM.from_pretrained(base_dir), modules_to_save=["lm_head"])
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.01)  # a trained head copy
        ref = pm(input_ids=IDS).logits
    out = save_merged(pm, tmp_path / "merged", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = m(input_ids=IDS).logits
    assert (got - ref).abs().max() < 0.05  # bf16 rounding of the weights
    # with fp32 the merge is exact to fp32 tolerance
    out32 = save_merged(pm, tmp_path / "merged32", dtype="float32")
    with torch.no_grad():
        got32 = AutoModelForCausalLM.from_pretrained(str(out32)).eval()(input_ids=IDS).logits
    torch.testing.assert_close(got32, ref, rtol=1e-4, atol=1e-5)


def test_merged_tied_model_with_lora_on_lm_head_keeps_the_merged_head(tmp_path):
    """Tied embeddings, LoRA on lm_head: the merged head differs from the embeddings, so the export
    unties them (re-tying on load would drop the head's update)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "tied", tie=True))
    torch.manual_seed(0)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        ref = pm.eval()(input_ids=IDS).logits
    out = save_merged(pm, tmp_path / "merged", dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_merging_a_lora_on_the_embeddings_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "m"))
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(NotImplementedError, match="embed_tokens: merging a LoRA on an embedding layer"):
        save_merged(pm, tmp_path / "merged", dtype=torch.float32)
    assert not (tmp_path / "merged").exists()
    save_lora_adapter(pm, None, tmp_path / "adapter")  # the adapter itself exports
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_full_model_export_and_atomic_replace(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = make_model_dir(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    out = tmp_path / "export"
    (out / "checkpoint-5").mkdir(parents=True)  # the training output_dir (transformers' save_model() target)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "model-00002-of-00002.safetensors").write_text("a previous, sharded export")
    (out / "model.safetensors.index.json").write_text("{}")
    save_merged(model, out, dtype=torch.float32)
    # the previous export's weights are gone (they would be loaded by its index); the run's files stay
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "config.json", "generation_config.json",
                                                     "metrics.jsonl", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(out))(input_ids=IDS).logits,
                                   model(input_ids=IDS).logits)


def test_failed_export_leaves_previous_one(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from unsloth_dist.models import export

    model = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "m"))
    out = save_merged(model, tmp_path / "export", dtype=torch.float32)
    before = sorted(p.name for p in out.iterdir())

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_merged(model, out, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_errors(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "m"))
    with pytest.raises(TypeError, match="needs a peft model"):
        save_lora_adapter(model, None, tmp_path / "a")
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        save_merged(model, tmp_path / "x", dtype=torch.int8)
    with pytest.raises(ValueError, match="needs the model"):
        save_merged({"w": torch.zeros(1)}, tmp_path / "x")
    pm = _lora(model)
    with pytest.raises(ValueError, match="adapter 'other'"):
        save_lora_adapter(pm, None, tmp_path / "a", adapter="other")


@pytest.mark.slow
def test_model_save_pretrained_after_multi_rank_training(tmp_path, deepspeed_cpu_ops):
    """The notebook line `model.save_pretrained(dir)` on every rank after ddp / fsdp / zero3 training
    writes what the collective exporters write (fsdp / zero3 gather their shards first)."""
    import json

    from safetensors.torch import load_file

    from conftest import run_cmd, torchrun

    run_cmd(torchrun(2, "tests/workers/save_pretrained.py", str(tmp_path)), timeout=900)
    records = json.loads((tmp_path / "records.json").read_text())
    failed = records.pop("failed-export")  # rank 0's write failed: both ranks raise
    assert failed[0] == "OSError: disk full" and failed[1].startswith("RuntimeError: rank 0 failed to write"), failed
    assert not (tmp_path / "failed").exists()
    assert set(records) == {"ddp-lora", "fsdp-lora", "fsdp-full", "zero3-lora"}
    for name in records:
        fname = "model.safetensors" if name.endswith("full") else "adapter_model.safetensors"
        got = load_file(str(tmp_path / name / "save_pretrained" / fname))
        want = load_file(str(tmp_path / name / "reference" / fname))
        assert set(got) == set(want) and got, name
        for k in want:
            assert got[k].shape == want[k].shape and got[k].numel() > 0, (name, k, got[k].shape)
            assert torch.equal(got[k], want[k]), (name, k)


def test_reexport_over_a_previous_export_is_one_atomic_swap(tmp_path, monkeypatch):
    """A previous export (files only) is exchanged for the new one in one step: no file-by-file
    moves that a crash could stop half-way (new weights beside the old adapter_config.json); a file
    the user added there stays; the previous weights do not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from unsloth_dist.models import export

    base_dir = make_model_dir(tmp_path / "m")
    out = tmp_path / "adapter"
    save_lora_adapter(_lora(AutoModelForCausalLM.from_pretrained(base_dir)), None, out)
    (out / "notes.txt").write_text("mine")
    (out / "old.safetensors").write_text("a previous export's extra weights")
    if not export._exchange(tmp_path / "m", tmp_path / "m"):
        pytest.skip("no renameat2 RENAME_EXCHANGE here")

    def no_moves(*a, **k):  # what the file-by-file path does; a crash there would be half-written
        raise KeyboardInterrupt("killed mid-move")

    monkeypatch.setattr(export.os, "replace", no_moves)
    from peft import LoraConfig, get_peft_model

    r8 = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                        LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    save_lora_adapter(r8, None, out)
    monkeypatch.undo()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert (out / "notes.txt").read_text() == "mine" and not (out / "old.safetensors").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))  # loads, shapes agree
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

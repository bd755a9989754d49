"""FastLanguageModel.from_pretrained / get_peft_model on CPU: local directories, clear errors (before
any weight is read), dtype policy, kernel patching through peft, and QLoRA (bitsandbytes NF4) as far
as bitsandbytes' CPU backend goes: 4-bit load, forward, a LoRA training step through the Trainer,
and the merged export of a QLoRA model."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

sys.path.insert(0, "tests/workers")
from models_common import make_model_dir, token_dataset  # noqa: E402

from unsloth_dist.models.device_map import DeviceMapError  # noqa: E402
from unsloth_dist.models.loader import FastLanguageModel, resolve_dtype  # noqa: E402

IDS = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33], [60, 61, 62, 63, 64, 65, 66, 67]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_loads_local_dir_with_tokenizer_kernels_and_logs(model_dir, caplog):
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.INFO, logger="unsloth_dist"):
        model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64)
    assert model.dtype == torch.float32  # dtype None on a CPU machine
    assert model.max_seq_length == 64 and tok.model_max_length == 64 and tok.pad_token == "<pad>"
    assert getattr(model, "unsloth_fused_loss", False) is True
    assert "device_map='auto' -> no GPU visible" in caplog.text and "swiglu" in caplog.text
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
    off, _ = FastLanguageModel.from_pretrained(model_dir, kernels=False, dtype="bfloat16")
    assert not getattr(off, "unsloth_fused_loss", False) and off.dtype == torch.bfloat16


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FastLanguageModel.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        FastLanguageModel.from_pretrained("models/a/b/c")
    with pytest.raises(ValueError, match="both set"):
        FastLanguageModel.from_pretrained("x", load_in_4bit=True, load_in_8bit=True)


def test_impossible_device_map_fails_before_loading(model_dir, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(DeviceMapError, match="none is visible"):
        FastLanguageModel.from_pretrained(model_dir, device_map="cuda")
    with pytest.raises(DeviceMapError, match="max_memory"):
        FastLanguageModel.from_pretrained(model_dir, device_map="cpu", max_memory={"cpu": "10KiB"})


def test_resolve_dtype():
    assert resolve_dtype(None) == (torch.float32 if not torch.cuda.is_available() else resolve_dtype("auto"))
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int8")


def test_get_peft_model_defaults_seed_and_kernels(model_dir):
    model, _ = FastLanguageModel.from_pretrained(model_dir)
    a = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=11)
    targets = set(a.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert getattr(a, "unsloth_fused_loss", False) is True  # patching survives the peft wrap
    mlp = a.get_base_model().model.layers[0].mlp
    assert type(mlp.gate_proj).__module__.startswith("peft") and "_unsloth_patch" in mlp.__dict__
    model2, _ = FastLanguageModel.from_pretrained(model_dir)
    rng = torch.random.get_rng_state()
    b = FastLanguageModel.get_peft_model(model2, r=4, lora_alpha=8, random_state=11)
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is left alone
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="already has peft adapters"):
        FastLanguageModel.get_peft_model(a)
    model3, _ = FastLanguageModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="match no linear layer"):
        FastLanguageModel.get_peft_model(model3, target_modules=["query_key_value"])
    c = FastLanguageModel.get_peft_model(model3, r=2, target_modules=["q_proj"], use_rslora=True,
                                         use_gradient_checkpointing="unsloth")
    assert c.get_base_model().is_gradient_checkpointing and c.peft_config["default"].use_rslora


# ------------------------------------------------------------------ QLoRA on bitsandbytes' CPU backend


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def test_qlora_load_forward_train_step_and_merged_export(model_dir, bnb, tmp_path):
    from transformers import AutoModelForCausalLM

    from unsloth_dist import Trainer
    from unsloth_dist.models.export import save_merged

    model, tok = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.dtype == torch.bfloat16  # packed, bf16 storage
    qc = model.config.quantization_config
    assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
    assert qc.bnb_4bit_compute_dtype == torch.bfloat16 and qc.bnb_4bit_quant_storage == torch.bfloat16
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = plain(input_ids=IDS).logits
        # train mode (no dropout in this model): in eval mode bitsandbytes repacks the weights into its
        # CPU inference layout (uint8) on CPUs with AVX512-BF16, which would hide the storage checks below
        got = model.train()(input_ids=IDS).logits.float()
    assert q.weight.dtype == torch.bfloat16
    assert (got - ref).norm() < 0.25 * ref.norm()  # NF4 of random weights: close, not equal
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    packed_before = q.weight.detach().clone()
    try:
        trainer = Trainer(model, token_dataset(8), args=dict(output_dir=str(tmp_path / "o"), max_steps=2,
                          per_device_train_batch_size=4, learning_rate=1e-2, precision="fp32", disable_tqdm=True),
                          backend="single")
        result = trainer.train()
    except (RuntimeError, NotImplementedError) as exc:  # bitsandbytes' CPU backward is not everywhere
        pytest.skip(f"bitsandbytes 4-bit backward does not run on this CPU: {exc}")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # the backend's model.to(dtype=float32) left the packed weights alone
    assert q.weight.dtype == torch.bfloat16 and torch.equal(q.weight, packed_before)
    lora_b = model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # adapters trained
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits.float()
    out = save_merged(trainer, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # dequantised: plain transformers
    assert "quantization_config" not in merged.config.to_dict()
    with torch.no_grad():
        m = merged(input_ids=IDS).logits
    # bf16 compute in the 4-bit forward vs fp32 in the merged model
    assert (m - trained).abs().max() < 0.02 * trained.abs().max() + 0.02


# ------------------------------------------------------------------ unsloth's own arguments and notebook lines


def test_unsloth_from_pretrained_arguments_are_accepted(model_dir, caplog, monkeypatch):
    """unsloth's from_pretrained arguments load (they went to the model constructor and crashed); the
    vLLM-only ones warn once; max_seq_length None is the model's; rope_scaling reaches the config;
    load_in_4bit not given: a notice (unsloth's default is 4-bit); load_in_8bit: a clear error."""
    from unsloth_dist.models import loader

    monkeypatch.setattr(loader, "_NOTICED", set())
    with caplog.at_level(logging.WARNING, logger="unsloth_dist"):
        model, tok = FastLanguageModel.from_pretrained(
            model_dir, max_seq_length=None, dtype=None, full_finetuning=False, fast_inference=True, fix_tokenizer=True,
            rope_scaling=None, use_exact_model_name=False, token=None, device_map="auto", trust_remote_code=False,
            revision=None, max_lora_rank=16, gpu_memory_utilization=0.6, random_state=3407)
        FastLanguageModel.from_pretrained(model_dir, fast_inference=True, load_in_4bit=False)
    assert model.max_seq_length == 4096 and tok.model_max_length == 4096  # the config's max_position_embeddings
    assert caplog.text.count("vLLM options") == 1 and caplog.text.count("load_in_4bit not given") == 1
    scaled, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False,
                                                  rope_scaling={"type": "linear", "factor": 2.0})
    rope = scaled.config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == 2.0 and rope["rope_theta"] == 10000.0
    assert scaled.model.rotary_emb.rope_type == "linear"
    with pytest.raises(ValueError, match="load_in_8bit=True is not supported"):
        FastLanguageModel.from_pretrained(model_dir, load_in_8bit=True)


def test_full_finetuning_and_continued_pretraining_targets(model_dir):
    """full_finetuning=True: no quantization, every weight trains, get_peft_model leaves it as is;
    "embed_tokens" / "lm_head" in target_modules are trained in full (modules_to_save), as unsloth does."""
    full, _ = FastLanguageModel.from_pretrained(model_dir, full_finetuning=True, load_in_4bit=True)
    assert type(full.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # not quantized
    assert FastLanguageModel.get_peft_model(full, r=4) is full
    assert all(p.requires_grad for p in full.parameters())
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
    pm = FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
    cfg = pm.peft_config["default"]
    assert set(cfg.target_modules) == set(targets[:7]) and set(cfg.modules_to_save) >= {"embed_tokens", "lm_head"}
    trained = {n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n}
    assert any("embed_tokens.modules_to_save" in n for n in trained) and any("lm_head.modules_to_save" in n for n in trained)


def test_for_inference_pads_left_and_for_training_restores(model_dir):
    """for_inference: left padding (batched generation equals one-by-one), no checkpointing, eval mode;
    for_training: right padding, checkpointing as before (or as asked), train mode."""
    model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=32, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    layers = model.get_base_model().model.layers
    assert tok.padding_side == "right" and all(layer.gradient_checkpointing for layer in layers)
    FastLanguageModel.for_inference(model)
    assert tok.padding_side == "left" and not model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    with torch.no_grad():
        alone = model.generate(**tok(["the cat"], return_tensors="pt"), max_new_tokens=4, do_sample=False)[0, -4:]
        batch = tok(["the cat", "the dog sat on the mat and ran"], return_tensors="pt", padding=True)
        both = model.generate(**batch, max_new_tokens=4, do_sample=False)[0, -4:]
    assert alone.tolist() == both.tolist()
    FastLanguageModel.for_training(model)
    assert tok.padding_side == "right" and model.training and all(layer.gradient_checkpointing for layer in layers)
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_training(model, use_gradient_checkpointing=False)
    assert not any(layer.gradient_checkpointing for layer in layers)


def test_model_save_pretrained_merged_notebook_line(model_dir, tmp_path):
    """model.save_pretrained_merged(dir, tokenizer, save_method=...) on the model get_peft_model returns."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=32, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        ref = model.eval()(input_ids=IDS).logits
    model.save_pretrained_merged(str(tmp_path / "merged"), tok, save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    import json

    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - ref).abs().max() < 0.05  # bf16 rounding
    model.save_pretrained_merged(str(tmp_path / "lora"), tok, save_method="lora")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="save_method='merged_4bit'"):
        model.save_pretrained_merged(str(tmp_path / "q"), tok, save_method="merged_4bit")


def test_a_training_checkpoint_is_not_loaded_as_a_model(tmp_path):
    from unsloth_dist.models.loader import resolve_model_path

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "unsloth_checkpoint.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="training checkpoint.*resume_from_checkpoint.*checkpoint consolidate"):
        resolve_model_path(str(ckpt))

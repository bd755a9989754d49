"""Tiny models and datasets built from configs (nothing is downloaded)."""
from __future__ import annotations

import random

import torch


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4 if hidden < 256 else hidden // 64,
        num_key_value_heads=2 if hidden < 256 else hidden // 256,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.float()


def add_lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, cfg)
    # peft initialises lora_B to zero; give it small values so LoRA gradients of A are non-zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def ragged_dataset(n: int = 32, seed: int = 0, vocab: int = 128, min_len: int = 6, max_len: int = 16):
    """Samples of different lengths whose labels mask a different number of prompt tokens (-100)."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(vocab) for _ in range(length)]
        masked = rng.randint(0, length - 2)
        labels = [-100] * masked + ids[masked:]
        data.append({"input_ids": ids, "labels": labels})
    return data


def poison_grad(param, at_call: int = 2) -> None:
    """Make `param`'s gradient inf on the `at_call`-th backward through it (the loss stays finite)."""
    calls = [0]

    def hook(g):
        calls[0] += 1
        return g * float("inf") if calls[0] == at_call else g

    param.register_hook(hook)

"""Shared helpers of the models tests and workers: a tiny local model directory (config + weights +
a word-level tokenizer built with the `tokenizers` library) -- nothing is downloaded."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "red", "blue", "big", "small", "house",
         "tree", "and", "then", "it", "was", "happy", "sad", "fast", "slow", "home"]


def make_tokenizer(vocab_size: int = 128):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def make_model_dir(path, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, tie: bool = False,
                   tokenizer: bool = True) -> str:
    """A tiny Llama saved with save_pretrained (fp32) plus its tokenizer."""
    from tiny import tiny_llama

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    model = tiny_llama(seed=seed, vocab=vocab, hidden=hidden, layers=layers, tie=tie)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    model.generation_config.bos_token_id = 2
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 3, 2
    model.save_pretrained(str(path))
    if tokenizer:
        make_tokenizer(vocab).save_pretrained(str(path))
    return str(path)


def text_dataset(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(5, 12)))} for _ in range(n)]


def token_dataset(n: int = 32, seed: int = 0, vocab: int = 128, min_len: int = 6, max_len: int = 16) -> list[dict]:
    """Learnable data: a few repeating patterns, so the loss falls quickly."""
    rng = random.Random(seed)
    patterns = [[rng.randrange(4, vocab) for _ in range(4)] for _ in range(3)]
    data = []
    for _ in range(n):
        p = rng.choice(patterns)
        length = rng.randint(min_len, max_len)
        ids = (p * (length // 4 + 1))[:length]
        data.append({"input_ids": ids})
    return data


def lora_keys_changed(before: dict, after: dict) -> tuple[set, set]:
    moved = {k for k, v in before.items() if not torch.equal(v.float(), after[k].float())}
    return moved, {k for k in moved if "lora_" not in k}

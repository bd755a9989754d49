"""Tokenizers built locally for the data tests (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "examples" / "data"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer(extra_text: str = "", chat_template: str | None = CHATML):
    """Word-level tokenizer (whitespace / punctuation split) with ChatML special tokens; the
    end-of-turn token <|im_end|> is its EOS. Every token is a whole word, so expected labels can
    be written down by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [
        "user assistant system hello hi there how are you I am fine thanks what is two plus three five "
        "tell me a joke no why the sky blue because of light scattering good bye see you later",
        extra_text,
    ]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def shipped_texts() -> list[str]:
    texts = []
    for name in ("instructions.jsonl", "chat.jsonl"):
        with open(SHIPPED / name) as f:
            for line in f:
                row = json.loads(line)
                if "messages" in row:
                    texts.extend(m["content"] for m in row["messages"])
                else:
                    texts.extend(str(row.get(k, "")) for k in ("instruction", "input", "output"))
    return texts


def bpe_tokenizer(texts: list[str] | None = None, vocab_size: int = 400, chat_template: str | None = None):
    """Byte-level BPE (GPT-2 style) trained on `texts` (default: the shipped dataset), with
    <s> (BOS, added by the post-processor), </s> (EOS) and <pad>. No chat template unless given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else shipped_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts + ["<|user|> <|assistant|> <|system|>"], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast

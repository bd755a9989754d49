"""Completion-only labels, token by token: exactly the assistant content and the token that
closes each assistant turn, for multi-turn chats, through several templates and tokenizers."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from data_common import bpe_tokenizer, word_tokenizer  # noqa: E402

from unsloth_dist.data.encode import Encoder, Skip  # noqa: E402
from unsloth_dist.data.templates import BUILTIN_TEMPLATES, resolve_template  # noqa: E402

CHAT = [
    {"role": "system", "content": "you are fine"},
    {"role": "user", "content": "hello how are you"},
    {"role": "assistant", "content": "I am fine thanks"},
    {"role": "user", "content": "what is two plus three"},
    {"role": "assistant", "content": "five"},
    {"role": "user", "content": "tell me a joke"},
    {"role": "assistant", "content": "no"},
]


def _encoder(tok, template=None, completions_only=True, max_len=512, truncation="drop"):
    return Encoder(tok, resolve_template(template, tok), completions_only=completions_only,
                   max_seq_length=max_len, truncation=truncation)


def _trained_runs(tok, enc):
    """The trained tokens as runs of consecutive tokens."""
    runs, cur = [], []
    for i, m in zip(enc.input_ids, enc.trained):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_multi_turn_labels_token_by_token_word_level():
    tok = word_tokenizer()
    enc = _encoder(tok).encode(CHAT)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    expected = []
    for m in CHAT:
        turn = ["<|im_start|>", m["role"]] + m["content"].split() + ["<|im_end|>"]
        # trained: the assistant content words and the <|im_end|> (EOS) that closes the turn
        flags = [0, 0] + [int(m["role"] == "assistant")] * (len(turn) - 2)
        expected += list(zip(turn, flags))
    assert list(zip(tokens, enc.trained)) == expected
    assert not enc.template_fallback


def test_everything_trained_when_not_completions_only():
    tok = word_tokenizer()
    enc = _encoder(tok, completions_only=False).encode(CHAT)
    assert all(enc.trained) and len(enc.trained) == len(enc.input_ids)


@pytest.mark.parametrize("template", [None, "default", "chatml", "llama3", "alpaca"])
def test_byte_level_bpe_labels_are_content_plus_eos(template):
    """A byte-level BPE without a chat template (None -> the built-in default) and the built-ins:
    each trained run decodes to one assistant message followed by EOS, in order."""
    tok = bpe_tokenizer(texts=[m["content"] for m in CHAT] * 5, vocab_size=300)
    assert tok.chat_template is None
    enc = _encoder(tok, template).encode(CHAT)
    runs = [tok.decode(r) for r in _trained_runs(tok, enc)]
    want = [m["content"] + tok.eos_token for m in CHAT if m["role"] == "assistant"]
    assert runs == want
    # the prompt the model is given at inference (history + generation prompt) tokenizes to exactly
    # the tokens before the turn, and the first token after it is the first trained one
    from unsloth_dist.data.templates import render

    source = resolve_template(template, tok)
    for i, m in enumerate(CHAT):
        if m["role"] != "assistant":
            continue
        prompt = tok(render(source, CHAT[:i], tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert enc.input_ids[: len(prompt)] == prompt
        assert not any(enc.trained[: len(prompt)][-3:]) and enc.trained[len(prompt)] == 1


def test_instruction_rows_become_a_user_and_an_assistant_turn():
    from unsloth_dist.data.formats import row_to_sample

    tok = word_tokenizer()
    msgs = row_to_sample({"instruction": "what is two plus three", "input": "", "output": "five"}, "instruction", {})
    assert msgs == [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "five"}]
    enc = _encoder(tok).encode(msgs)
    assert [t for t, m in zip(tok.convert_ids_to_tokens(enc.input_ids), enc.trained) if m] == ["five", "<|im_end|>"]
    msgs = row_to_sample({"instruction": "tell me", "input": "a joke", "output": "no", "system": "be good"}, "instruction", {})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[1]["content"] == "tell me\n\na joke"


def test_sharegpt_roles_are_mapped():
    from unsloth_dist.data.formats import MissingField, row_to_sample

    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}]}
    assert [m["role"] for m in row_to_sample(row, "sharegpt", {})] == ["system", "user", "assistant"]
    bad = row_to_sample({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", {})
    assert isinstance(bad, MissingField) and "alien" in bad.detail


def test_chat_rows_with_other_speaker_names_are_trained():
    # Gemma-style "model" replies (and ShareGPT's names inside "messages") were rendered as an
    # unknown role and the row skipped as no_target
    from unsloth_dist.data.formats import row_to_sample

    row = {"messages": [{"role": "Human", "content": "hi there"}, {"role": "model", "content": "hello friend"},
                        {"role": "user", "content": "again"}, {"role": "gpt", "content": "sure thing"}]}
    msgs = row_to_sample(row, "chat", {})
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    odd = row_to_sample({"messages": [{"role": "ipython", "content": "x"}]}, "chat", {})
    assert odd[0]["role"] == "ipython"  # roles a template may know pass through
    tok = word_tokenizer("hi there hello friend again sure thing")
    enc = _encoder(tok).encode(msgs)
    assert not isinstance(enc, Skip)
    assert [tok.convert_ids_to_tokens(r) for r in _trained_runs(tok, enc)] == [
        ["hello", "friend", "<|im_end|>"], ["sure", "thing", "<|im_end|>"]]


def test_template_that_is_not_prefix_stable_falls_back_to_content_search():
    # renders the final assistant turn differently from earlier ones (like templates that strip
    # reasoning from history): prefixes are not prefixes of the whole
    unstable = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if loop.last %}{{ 'final ' }}{% endif %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = word_tokenizer(extra_text="final", chat_template=unstable)
    enc = _encoder(tok).encode(CHAT)
    assert enc.template_fallback
    trained = [t for t, m in zip(tok.convert_ids_to_tokens(enc.input_ids), enc.trained) if m]
    assert trained == "I am fine thanks <|im_end|> five <|im_end|> no <|im_end|>".split()


def test_fallback_places_contents_exactly_and_trains_no_header():
    """A template that is not prefix-stable (a header counting the messages) and an assistant reply
    ("a") that also occurs inside the header's text ("assistant"): the contents' places come from
    the template itself (a render with markers), so neither the header nor the next turn's opening
    is trained; the end-of-turn token right after each reply is."""
    counting = (
        "{{ 'turns ' ~ (messages|length) ~ '\n' }}{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = word_tokenizer(extra_text="turns 1 2 3 4 a s why", chat_template=counting)
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "why"}, {"role": "assistant", "content": "s"}]
    enc = _encoder(tok).encode(chat)
    assert enc.template_fallback
    trained = [t for t, m in zip(tok.convert_ids_to_tokens(enc.input_ids), enc.trained) if m]
    assert trained == "a <|im_end|> s <|im_end|>".split()


def test_truncation_policies():
    tok = word_tokenizer()
    full = _encoder(tok).encode(CHAT)
    n = len(full.input_ids)
    assert isinstance(_encoder(tok, max_len=n - 1, truncation="drop").encode(CHAT), Skip)
    right = _encoder(tok, max_len=n - 3, truncation="right").encode(CHAT)
    assert right.input_ids == full.input_ids[: n - 3] and right.truncated
    left = _encoder(tok, max_len=10, truncation="left").encode(CHAT)
    assert left.input_ids == full.input_ids[-10:] and left.trained == full.trained[-10:]
    # a cut that leaves no assistant token: skipped as no_target
    out = _encoder(tok, max_len=8, truncation="right").encode(CHAT)
    assert isinstance(out, Skip) and out.reason == "no_target"


def test_builtin_templates_render_generation_prompt_as_a_prefix():
    tok = word_tokenizer()
    from unsloth_dist.data.templates import render

    for name, src in BUILTIN_TEMPLATES.items():
        whole = render(src, CHAT[:3], tok)
        prompt = render(src, CHAT[:2], tok, add_generation_prompt=True)
        assert whole.startswith(prompt), name

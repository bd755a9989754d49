"""Render and tokenize one sample, and mark which tokens are trained on.

Completion-only masking works on characters first, tokens second:

1. The conversation is rendered whole, and for every assistant turn `i` also the prefixes
   `messages[:i]` (with the generation prompt) and `messages[:i+1]`. Each prefix must be a
   string prefix of the whole rendering; then the turn's text lies between the two prefix
   lengths, and its content is found inside that window. Templates whose renderings are not
   prefix-stable (e.g. ones that rewrite earlier turns) fall back to finding each message's
   content in order in the whole rendering (counted in the report as `template_fallback`).
2. The whole rendering is tokenized once. With a fast tokenizer the offset mapping gives each
   token's characters; a token is trained when its characters overlap the assistant content, or
   when it closes the turn: after the content, up to and including the first special token
   (EOS / end-of-turn) before the next turn, and never trailing whitespace. Without offsets (slow
   tokenizers), token boundaries come from tokenizing prefixes, which must tokenize to a prefix
   of the whole (else the sample is an error naming the tokenizer).

So the labels are exactly the assistant content tokens and the token that ends the turn, and the
prompt tokens the model sees at inference are the ones it is conditioned on in training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from .templates import render

__all__ = ["Encoder", "Encoded", "Skip"]


@dataclass
class Encoded:
    input_ids: list[int]
    trained: list[int]  # 1 = this token is a target (its label is the token), 0 = ignored
    truncated: bool = False
    template_fallback: bool = False


@dataclass(frozen=True)
class Skip:
    reason: str  # too_long | no_target


class Encoder:
    def __init__(self, tokenizer: Any, template_source: Optional[str], *, completions_only: bool,
                 max_seq_length: int, truncation: str) -> None:
        self.tok = tokenizer
        self.template = template_source
        self.completions_only = completions_only
        self.max_len = max_seq_length
        self.truncation = truncation
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = eos if isinstance(eos, int) else None
        if self.eos_id is not None:
            self.special_ids.add(self.eos_id)
        self.fast = bool(getattr(tokenizer, "is_fast", False))

    # ------------------------------------------------------------------ public

    def encode(self, sample: Union[str, list]) -> Union[Encoded, Skip]:
        if isinstance(sample, str):
            enc = self._text(sample)
        else:
            enc = self._chat(sample)
        return self._fit(enc)

    # ------------------------------------------------------------------ pieces

    def _text(self, text: str) -> Encoded:
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return Encoded(ids, [1] * len(ids))

    def _render(self, msgs: list, gen: bool) -> str:
        return render(self.template, msgs, self.tok, add_generation_prompt=gen)

    def _assistant_regions(self, msgs: list, full: str) -> tuple[list[tuple[int, int, int]], bool]:
        """(content start, content end, turn limit) in characters for every assistant turn, and
        whether the prefix-stable method had to be abandoned."""
        regions = []
        try:
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = self._render(msgs[:i], True) if i > 0 else self._render_empty_prompt()
                upto = self._render(msgs[: i + 1], False)
                if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
                    raise _NotPrefixStable
                cs, ce = _find_content(full, m["content"], len(before), len(upto))
                regions.append((cs, ce, len(upto)))
            return regions, False
        except _NotPrefixStable:
            pass
        placed = self._placed_contents(msgs, full)
        if placed is not None:
            for i, m in enumerate(msgs):
                if m["role"] == "assistant" and i in placed:
                    nxt = min((placed[j][0] for j in placed if j > i), default=len(full))
                    regions.append((placed[i][0], placed[i][1], nxt))
            return regions, True
        # last resort (the template rewrites the contents): each message's content found in order
        regions, cursor = [], 0
        starts = []
        for m in msgs:
            c = m["content"]
            idx = full.find(c, cursor) if c else -1
            if idx < 0 and c.strip():
                idx = full.find(c.strip(), cursor)
                c = c.strip()
            starts.append((idx, idx + len(c)) if idx >= 0 else None)
            if idx >= 0:
                cursor = idx + len(c)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or starts[i] is None:
                continue
            nxt = next((s[0] for s in starts[i + 1 :] if s is not None), len(full))
            regions.append((starts[i][0], starts[i][1], nxt))
        return regions, True

    def _placed_contents(self, msgs: list, full: str) -> Optional[dict[int, tuple[int, int]]]:
        """Where the template puts each message's content, exactly: the chat rendered with a marker
        in place of every content splits into the template's own text and the contents; when the
        real contents put back between those pieces give `full`, their places are known (no text
        search, which can match inside a header). None when the template changes the contents."""
        marks = [f"\ue000{i}\ue001" for i in range(len(msgs))]
        try:
            skeleton = self._render([dict(m, content=marks[i]) for i, m in enumerate(msgs)], False)
        except Exception:
            return None
        parts = re.split("\ue000(\\d+)\ue001", skeleton)  # text, index, text, index, ..., text
        placed: dict[int, tuple[int, int]] = {}
        rebuilt, pos = [], 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                piece = part
            else:
                i = int(part)
                if i in placed or i >= len(msgs) or not isinstance(msgs[i].get("content"), str):
                    return None
                piece = msgs[i]["content"]
                placed[i] = (pos, pos + len(piece))
            rebuilt.append(piece)
            pos += len(piece)
        return placed if "".join(rebuilt) == full else None

    def _render_empty_prompt(self) -> str:
        try:
            return self._render([], True)
        except Exception:
            raise _NotPrefixStable from None

    def _chat(self, msgs: list) -> Encoded:
        full = self._render(msgs, False)
        if not self.completions_only:
            ids = self._ids(full)
            return Encoded(ids, [1] * len(ids))
        regions, fallback = self._assistant_regions(msgs, full)
        if self.fast:
            out = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]

            def content_tokens(cs: int, ce: int) -> list[int]:
                return [t for t, (a, b) in enumerate(offsets) if b > a and a < ce and b > cs]

            def tail_tokens(ce: int, limit: int) -> list[int]:
                return [t for t, (a, b) in enumerate(offsets) if ce <= a < limit and b > a]

            def is_blank(t: int) -> bool:
                a, b = offsets[t]
                return not full[a:b].strip()
        else:
            ids = self._ids(full)
            n_at = self._token_counts_at(full, ids, sorted({p for r in regions for p in r}))

            def content_tokens(cs: int, ce: int) -> list[int]:
                return list(range(n_at[cs], n_at[ce]))

            def tail_tokens(ce: int, limit: int) -> list[int]:
                return list(range(n_at[ce], n_at[limit]))

            def is_blank(t: int) -> bool:
                return not self.tok.decode([ids[t]]).strip()

        trained = [0] * len(ids)
        for cs, ce, limit in regions:
            for t in content_tokens(cs, ce):
                trained[t] = 1
            # the tokens that close the turn: up to the first special token, no trailing whitespace
            tail = [t for t in tail_tokens(ce, limit) if not trained[t]]
            special_at = next((k for k, t in enumerate(tail) if ids[t] in self.special_ids), None)
            if fallback:
                # the limit is the next message's content, past the next header: only an end-of-turn
                # special token right after the content (whitespace between) closes the turn
                chosen = (tail[: special_at + 1] if special_at is not None
                          and all(is_blank(t) for t in tail[:special_at]) else [])
            elif special_at is not None:
                chosen = tail[: special_at + 1]
            else:
                chosen = list(tail)
                while chosen and is_blank(chosen[-1]):
                    chosen.pop()
            for t in chosen:
                trained[t] = 1
        return Encoded(ids, trained, template_fallback=fallback)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _token_counts_at(self, full: str, ids: list[int], cuts: list[int]) -> dict[int, int]:
        """For tokenizers without an offset mapping: how many tokens of `full` lie before each
        character position in `cuts`; each prefix must tokenize to a prefix of the whole."""
        n_at = {}
        for p in cuts:
            pre = self._ids(full[:p])
            if ids[: len(pre)] != pre:
                raise ValueError(
                    f"{type(self.tok).__name__} has no offset mapping and tokenizes a chat prefix differently "
                    "from the whole chat, so completion-only labels cannot be placed exactly; use a fast "
                    "tokenizer or train_on_completions_only: false"
                )
            n_at[p] = len(pre)
        return n_at

    def _fit(self, enc: Encoded) -> Union[Encoded, Skip]:
        n = len(enc.input_ids)
        if n > self.max_len:
            if self.truncation == "drop":
                return Skip("too_long")
            if self.truncation == "right":
                enc = Encoded(enc.input_ids[: self.max_len], enc.trained[: self.max_len], True, enc.template_fallback)
            else:
                enc = Encoded(enc.input_ids[-self.max_len :], enc.trained[-self.max_len :], True, enc.template_fallback)
        # the first token of a sample is never predicted (nothing precedes it)
        if len(enc.input_ids) < 2 or not any(enc.trained[1:]):
            return Skip("no_target")
        return enc


class _NotPrefixStable(Exception):
    pass


def _find_content(full: str, content: str, lo: int, hi: int) -> tuple[int, int]:
    for c in (content, content.strip()):
        if c:
            idx = full.find(c, lo, hi)
            if idx >= 0:
                return idx, idx + len(c)
    # the template rewrote the content: the whole turn after the generation prompt, less trailing space
    end = hi
    while end > lo and full[end - 1].isspace():
        end -= 1
    return lo, end

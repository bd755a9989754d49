"""Chat templates: the built-in ones (for tokenizers without a chat template, or by name) and
rendering a conversation through a Jinja template.

Every built-in template closes an assistant turn with the tokenizer's EOS token, so a model
trained on it learns to stop; `bos_token` / `eos_token` render as "" when the tokenizer has none.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

__all__ = ["BUILTIN_TEMPLATES", "looks_like_jinja", "resolve_template", "render"]

# Plain-text role markers: they need no added tokens, so they work with any tokenizer.
_DEFAULT = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CHATML = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token or '<|im_end|>' }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token or '<|eot_id|>' }}{% else %}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_ALPACA = (
    "{{ bos_token or '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + (eos_token or '') + '\n\n' }}"
    "{% else %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"default": _DEFAULT, "chatml": _CHATML, "llama3": _LLAMA3, "alpaca": _ALPACA}


def looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def resolve_template(template: Optional[str], tokenizer: Any) -> str:
    """The Jinja source to render with: a built-in by name, the given Jinja string, the
    tokenizer's own chat template, or the built-in `default` when the tokenizer has none."""
    if template is not None:
        return BUILTIN_TEMPLATES.get(template, template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the one called "default"
        own = own.get("default")
    return own if isinstance(own, str) and own else _DEFAULT


@lru_cache(maxsize=16)
def _compiled(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render(source: str, messages: list[dict], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """Render `messages` with the Jinja template `source` and the tokenizer's special tokens
    (through the tokenizer's own `apply_chat_template` where it has one, so the globals and
    filters real model templates use are there)."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is not None:
        text = apply(messages, chat_template=source, tokenize=False, add_generation_prompt=add_generation_prompt)
        if isinstance(text, str):
            return text
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        special[name] = value if isinstance(value, str) else (str(value) if value is not None else None)
    return _compiled(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)

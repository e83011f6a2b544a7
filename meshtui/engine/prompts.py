"""A request's prompt as tokens: raw text, or turns rendered with the model's own chat template."""

from __future__ import annotations

from typing import Any

from meshtui.engine.protocol import Generate


def prompt_tokens(model: Any, metadata: dict[str, str], cmd: Generate) -> list[int]:
    """`model` is llama-cpp-python's `_internals.LlamaModel` (tokenize, token_get_text, token_bos/eos)."""
    if cmd.raw:
        return list(model.tokenize((cmd.prompt or "").encode("utf-8"), add_bos=True, special=True))
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = metadata.get("tokenizer.chat_template")
    turns = cmd.messages or ({"role": "user", "content": cmd.prompt or ""},)
    messages: Any = [dict(m) for m in turns]
    if not template:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return list(model.tokenize(text.encode("utf-8"), add_bos=True, special=True))
    eos = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
    bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    rendered = formatter(messages=messages)
    add_bos = not (bos and rendered.prompt.startswith(bos))
    return list(model.tokenize(rendered.prompt.encode("utf-8"), add_bos=add_bos, special=True))

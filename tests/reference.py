"""The oracle: llama-cpp-python running a model alone on the head, greedy, with its own public API.

Run as a script so the model lives in its own process:
    python tests/reference.py MODEL PROMPT MAX_TOKENS CONTEXT  ->  {"text": ..., "tokens": [...]}
    python tests/reference.py --lookup K MODEL PROMPT MAX_TOKENS CONTEXT  ->  the same, with llama-cpp-python's
        own speculative decoding: `draft_model=LlamaPromptLookupDecoding(num_pred_tokens=K)`
    python tests/reference.py --chat MODEL MESSAGES_JSON MAX_TOKENS CONTEXT
        ->  {"text": ..., "prompt_tokens": N, "completion_tokens": N, "finish_reason": ...}
            (llama-cpp-python's own `create_chat_completion`: its chat template handling, its sampling)
    python tests/reference.py --logprobs N MODEL PROMPT MAX_TOKENS CONTEXT
        ->  {"text": ..., "logprobs": {"tokens", "token_logprobs", "top_logprobs", "text_offset"}}
            (`Llama(logits_all=True).create_completion(logprobs=N)`, greedy)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def _run(*args: str) -> dict[str, Any]:
    """This script run in its own process with `args`: the JSON of its last line."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def reference_greedy(model: Path, prompt: str, max_tokens: int, context: int = 512) -> dict[str, object]:
    return _run(str(model), prompt, str(max_tokens), str(context))


def reference_lookup(model: Path, prompt: str, max_tokens: int, draft_tokens: int,
                     context: int = 512) -> dict[str, object]:
    return _run("--lookup", str(draft_tokens), str(model), prompt, str(max_tokens), str(context))


def reference_chat(model: Path, messages: list[dict[str, str]], max_tokens: int,
                   context: int = 512) -> dict[str, object]:
    return _run("--chat", str(model), json.dumps(messages), str(max_tokens), str(context))


def reference_logprobs(model: Path, prompt: str, max_tokens: int, top: int,
                       context: int = 512) -> dict[str, Any]:
    return _run("--logprobs", str(top), str(model), prompt, str(max_tokens), str(context))


def _logprobs_main() -> None:
    import llama_cpp

    top, model, prompt, max_tokens, context = (int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
                                               int(sys.argv[6]))
    llm = llama_cpp.Llama(model_path=model, n_ctx=context, n_threads=1, n_gpu_layers=0, verbose=False,
                          logits_all=True)
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=0, logprobs=top)
    choice = out["choices"][0]  # type: ignore[index]
    print(json.dumps({"text": choice["text"], "logprobs": choice["logprobs"]}, default=float))


def _chat_main() -> None:
    import llama_cpp

    model, messages, max_tokens, context = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    llm = llama_cpp.Llama(model_path=model, n_ctx=context, n_threads=1, n_gpu_layers=0, verbose=False)
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0)
    choice, usage = out["choices"][0], out["usage"]
    print(json.dumps({"text": choice["message"]["content"], "prompt_tokens": usage["prompt_tokens"],
                      "completion_tokens": usage["completion_tokens"], "finish_reason": choice["finish_reason"]}))


def _main() -> None:
    import llama_cpp

    if sys.argv[1] == "--chat":
        _chat_main()
        return
    if sys.argv[1] == "--logprobs":
        _logprobs_main()
        return
    draft = None
    if sys.argv[1] == "--lookup":
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=int(sys.argv[2]))
        del sys.argv[1:3]
    model, prompt, max_tokens, context = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llm = llama_cpp.Llama(model_path=model, n_ctx=context, n_threads=1, n_gpu_layers=0, verbose=False,
                          draft_model=draft)
    prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    generated: list[int] = []
    for token in llm.generate(prompt_tokens, temp=0.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(generated) >= max_tokens:
            break
        generated.append(token)
        if len(generated) >= max_tokens:
            break
    text = llm.detokenize(generated, prev_tokens=prompt_tokens).decode("utf-8", errors="replace")
    print(json.dumps({"text": text, "tokens": generated, "prompt_tokens": prompt_tokens,
                      "stopped": len(generated) < max_tokens}))


if __name__ == "__main__":
    _main()

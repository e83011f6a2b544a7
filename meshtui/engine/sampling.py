"""A request's sampler chain and its tokens' log-probabilities, in the engine process.

The chain is llama.cpp's own (`llama_sampler_chain_*`), built in the order llama-cpp-python's `Llama` builds it:
logit bias, penalties, grammar, then greedy or top-k / typical / top-p / min-p / temperature / dist. Each sample
accepts the token it returns into every sampler (`llama_sampler_sample`), so a grammar and the penalties follow
the reply token by token; the decoder samples a step's positions in order and stops at the first rejected draft,
so with drafts the chain sees exactly the tokens a plain run would have.

`llama_cpp` is passed in (the engine imports it lazily); nothing here imports it.
"""

from __future__ import annotations

import math
from typing import Any

from meshtui.engine.protocol import Generate

PENALTY_LAST_N = 64  # llama-cpp-python's default window for the repeat, presence and frequency penalties
GRAMMAR_ROOT = b"root"


class SamplerError(ValueError):
    """A request's sampling settings that llama.cpp refuses (a grammar it cannot parse)."""


def build_sampler(lib: Any, vocab: Any, request: Generate) -> Any:
    """The request's sampler chain; the caller frees it with `llama_sampler_free`."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lib.llama_sampler_chain_add(chain, sampler)

    n_vocab = lib.llama_vocab_n_tokens(vocab)
    if request.logit_bias:
        biases = (lib.llama_logit_bias * len(request.logit_bias))()
        for i, (token, bias) in enumerate(request.logit_bias):
            if not 0 <= int(token) < n_vocab:
                lib.llama_sampler_free(chain)
                raise SamplerError(f"logit_bias: token {token} is not in the vocabulary (0..{n_vocab - 1})")
            biases[i].token = int(token)
            biases[i].bias = float(bias)
        add(lib.llama_sampler_init_logit_bias(n_vocab, len(request.logit_bias), biases))
    add(lib.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, float(request.repeat_penalty),
                                         float(request.frequency_penalty), float(request.presence_penalty)))
    if request.grammar is not None:
        grammar = lib.llama_sampler_init_grammar(vocab, request.grammar.encode(), GRAMMAR_ROOT)
        if not grammar:
            lib.llama_sampler_free(chain)
            raise SamplerError("the grammar does not parse (llama.cpp refused it)")
        add(grammar)
    temperature = float(request.temperature)
    seed = int(request.seed)
    if temperature < 0:
        add(lib.llama_sampler_init_dist(seed))
    elif temperature == 0:
        add(lib.llama_sampler_init_greedy())
    else:
        add(lib.llama_sampler_init_top_k(int(request.top_k)))
        add(lib.llama_sampler_init_typical(1.0, 1))
        add(lib.llama_sampler_init_top_p(float(request.top_p), 1))
        add(lib.llama_sampler_init_min_p(float(request.min_p), 1))
        add(lib.llama_sampler_init_temp(temperature))
        add(lib.llama_sampler_init_dist(seed))
    return chain


def token_logprobs(lib: Any, ctx: Any, model: Any, index: int, token: int,
                   top: int) -> tuple[float, tuple[tuple[str, float], ...]]:
    """The sampled token's log-probability at batch position `index` and the `top` most likely tokens' (text,
    log-probability), best first: log-softmax of the raw logits (before bias, penalties and grammar), as
    llama-cpp-python reports them."""
    import numpy as np  # llama-cpp-python's own dependency: present wherever the engine runs

    n_vocab = lib.llama_vocab_n_tokens(model.vocab)
    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(n_vocab,)).astype(np.float64)
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak).sum()))
    chosen = float(logits[token]) - log_total
    if top <= 0:
        return chosen, ()
    best = np.argpartition(-logits, top - 1)[:top] if top < n_vocab else np.arange(n_vocab)
    best = best[np.argsort(-logits[best], kind="stable")]
    return chosen, tuple((model.detokenize([int(t)]).decode("utf-8", errors="replace"),
                          float(logits[t]) - log_total) for t in best)

"""Stage 3: the generation loop (prefill, then one token per step through the KV cache)."""
from typing import Callable

import torch

from .errors import UserError
from .hooks import at, record
from .kv_cache import KVCache
from .model import Model
from .output import Sampling
from .pipelines import PLAIN, Pipeline
from .text import create_tokens_tensor


def check_length(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """A run fits the model's context: the prompt plus every new token."""
    if prompt_len < 1:
        raise UserError("the prompt is empty: there is nothing to feed the model")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if prompt_len + max_new_tokens > context:
        raise UserError(f"prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens exceeds the "
                        f"model's context of {context} tokens")


def generate(model: Model, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             on_token: Callable[[int], None] | None = None, pipeline: Pipeline = PLAIN) -> list[int]:
    """Stage 3. tokens (S) -> tokens[P:P+T] (T) each step -> the new ids.

    Step 0 feeds the whole prompt (P = 0, T = T0); each later step feeds the
    token chosen by the step before (T = 1) while P counts the cached positions.
    Stops after max_new_tokens, or after a token that ends the model's turn. On the meta device
    (shapes only) the prompt step runs, and no token is chosen. Each step is `pipeline`'s pass
    through the model: the plain stages, or another implementation of the same computation.
    """
    check_length(len(prompt_ids), max_new_tokens, model.config.max_seq_len)
    max_len = len(prompt_ids) + max_new_tokens
    pad_id = model.tokenizer.pad_id if model.tokenizer else 0
    model.rotations(max_len)  # the table of every position of this run, made once
    tokens = create_tokens_tensor(prompt_ids, max_len, pad_id, model.device)  # (S)
    # As many KV heads as the model's wk makes: Hkv, or a tensor-parallel rank's Hkv/N.
    n_kv_heads = model.weights.layers[0].wk.shape[0] // model.config.head_dim
    caches = [KVCache.empty(max_len, n_kv_heads, model.config.head_dim, model.device, model.dtype)
              for _ in model.weights.layers]
    generator = None if sampling.greedy else torch.Generator().manual_seed(
        sampling.seed if sampling.seed is not None else torch.seed())
    stop_ids = model.tokenizer.stop_ids if model.tokenizer else frozenset()
    new_ids: list[int] = []
    start_pos, T = 0, len(prompt_ids)
    with torch.inference_mode():
        for step in range(max_new_tokens):
            at(step=step, layer=None)
            record(3, "tokens", tokens, copy=True)
            feed = record(3, "tokens[P:P+T]", tokens[start_pos:start_pos + T])  # (T)
            next_id, _ = pipeline.forward_step(model, feed, start_pos, caches, sampling, generator)
            if next_id is None:
                break
            tokens[start_pos + T] = next_id
            new_ids.append(next_id)
            if on_token:
                on_token(next_id)
            if next_id in stop_ids:
                break
            start_pos, T = start_pos + T, 1
    return new_ids

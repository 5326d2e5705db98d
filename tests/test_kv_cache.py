"""Decoding through the KV cache equals recomputing the whole sequence."""
import torch

from stages import Sampling, forward_step
from stages.kv_cache import KVCache

from .runs import record_run


def recompute_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits for the last position of `ids`, from scratch: fresh caches, one step at P = 0."""
    c = model.config
    caches = [KVCache.empty(len(ids), c.n_kv_heads, c.head_dim, model.device, model.dtype) for _ in range(c.n_layers)]
    with torch.inference_mode():
        _, logits = forward_step(model, torch.tensor(ids, device=model.device), 0, caches, Sampling(), None)
    return logits


def check_cache_equals_recompute(model, prompt: list[int], steps: int, atol: float):
    new_ids, ours = record_run(model, prompt, steps)
    for step in range(len(new_ids)):
        seen = prompt + new_ids[:step]
        torch.testing.assert_close(ours[(19, "logits", None, step)], recompute_logits(model, seen),
                                   rtol=1e-4, atol=atol)
        # The cache holds one row per position seen, and the scores cover all of them.
        assert ours[(11, "cache_k", 0, step)].shape[0] == len(seen)
        assert ours[(13, "scores (softmax)", 0, step)].shape[-1] == len(seen)


def test_tiny_cached_decode_equals_recompute(tiny):
    model, _ = tiny
    check_cache_equals_recompute(model, [0, 9, 8, 7, 6, 5], steps=8, atol=1e-5)


def test_embedded_cached_decode_equals_recompute(embedded_model):
    ids = embedded_model.tokenizer.encode("The quick brown fox", add_bos=False)
    check_cache_equals_recompute(embedded_model, ids, steps=5, atol=1e-3)

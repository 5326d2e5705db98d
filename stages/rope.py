"""Rotary position embeddings (stage 10), in the interleaved-pair layout of Meta's
and GGUF weights: dimensions (2i, 2i+1) of a head form one pair, rotated by the
angle pos·θ_i with θ_i = theta^(-2i/Dh).

(Hugging Face checkpoints permute the rows of wq and wk and rotate the pairs
(i, i+Dh/2) instead, "rotate_half"; that gives the same scores on *their*
weights, and wrong ones on these. stages.hf_folder permutes their rows back
when it loads them, so that one layout runs whatever the checkpoint.)

Llama 3.1 and later stretch the slow rotations for long contexts: each pair's
frequency is divided by a factor (1 for the fast pairs, `factor` for the slow
ones, a smooth blend between). GGUF files store those divisors as the tensor
rope_freqs; Hugging Face and Meta checkpoints give the recipe, `llama3_freq_factors`.
"""
import math

import torch

from .hooks import record

LAYOUT = "interleaved pairs (x[2i], x[2i+1])"
PAIRS = {"interleaved": "pairs (x[2i], x[2i+1])", "rotate-half": "pairs (x[i], x[i+Dh/2])"}  # by layout


def base_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """θ_i = theta^(-2i/Dh) for each pair i: (Dh/2), float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def llama3_freq_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> torch.Tensor:
    """(Dh/2) divisors of the pairs' frequencies under Llama 3.1's RoPE scaling: pairs that turn
    more than high_freq_factor times over the original context keep their speed, those that
    turn less than low_freq_factor times are slowed by `factor`, the ones between are blended."""
    if not (factor > 0 and 0 < low_freq_factor < high_freq_factor and original_context > 0):
        raise ValueError(f"impossible llama3 RoPE scaling: factor {factor}, low_freq_factor {low_freq_factor}, "
                         f"high_freq_factor {high_freq_factor}, original context {original_context}")
    freqs = base_frequencies(head_dim, theta).double()
    turns = original_context * freqs / (2 * math.pi)  # full turns of each pair over the original context
    smooth = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    scaled = (1 - smooth) * freqs / factor + smooth * freqs
    return (freqs / scaled).float()


def precompute_freqs_cis(head_dim: int, max_len: int, theta: float,
                         freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """exp(j·pos·θ_i / factor_i) for every position and pair: (max_len, Dh/2), complex64."""
    inv_freq = base_frequencies(head_dim, theta)  # (Dh/2)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float().cpu()
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, Dh/2)
    return torch.polar(torch.ones_like(angles), angles)


def reorder(x: torch.Tensor, head_dim: int, to: str, dim: int = -1) -> torch.Tensor:
    """`x` with each head's Dh numbers along `dim` put in the other RoPE layout: to 'rotate-half'
    from interleaved pairs (pair i at 2i, 2i+1 -> at i, i+Dh/2), to 'interleaved' the way back.
    No number changes; this is how one layout's queries and keys are compared with the other's."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])  # interleaved -> halves
    if to == "interleaved":
        order = torch.argsort(order)
    elif to != "rotate-half":
        raise ValueError(f"unknown RoPE layout {to!r}")
    heads = x.movedim(dim, -1).unflatten(-1, (-1, head_dim))  # (..., heads, Dh)
    return heads[..., order.to(x.device)].flatten(-2).movedim(-1, dim)


def _rotate(stage_name: str, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: (T, heads, Dh); freqs_cis: (T, Dh/2)
    pairs = record(10, f"{stage_name} (pairs)", x.float().reshape(*x.shape[:-1], -1, 2))  # (T, heads, Dh/2, 2)
    as_complex = record(10, f"{stage_name} (complex)", torch.view_as_complex(pairs))  # (T, heads, Dh/2)
    rotated = as_complex * freqs_cis[:, None, :]  # broadcast over heads: (T, heads, Dh/2)
    out = torch.view_as_real(rotated).flatten(-2).type_as(x)  # (T, heads, Dh/2, 2) -> (T, heads, Dh)
    return record(10, f"{stage_name} (rotated)", out)


def apply_rotary_embeddings(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Stage 10. xq (T, H, Dh), xk (T, Hkv, Dh), freqs_cis (T, Dh/2) -> rotated xq, xk, same shapes."""
    record(10, "xq (reshaped)", xq)
    record(10, "xk (reshaped)", xk)
    record(10, "freqs_cis", freqs_cis)
    return _rotate("xq", xq, freqs_cis), _rotate("xk", xk, freqs_cis)

"""Rotary position embeddings (stage 10), in the interleaved-pair layout of Meta's
and GGUF weights: dimensions (2i, 2i+1) of a head form one pair, rotated by the
angle pos·θ_i with θ_i = theta^(-2i/Dh).

(Hugging Face checkpoints permute the rows of wq and wk and rotate the pairs
(i, i+Dh/2) instead, "rotate_half"; that gives the same scores on *their*
weights, and wrong ones on these.)
"""
import torch

from .hooks import record

LAYOUT = "interleaved pairs (x[2i], x[2i+1])"


def precompute_freqs_cis(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """exp(j·pos·θ_i) for every position and pair: (max_len, Dh/2), complex64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (Dh/2)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, Dh/2)
    return torch.polar(torch.ones_like(angles), angles)


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

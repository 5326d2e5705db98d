"""Stage 17: the SwiGLU feed-forward module."""
import torch
import torch.nn.functional as F

from .hooks import record
from .tensor_parallel import parallel_linear


def feed_forward(h: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Stage 17. normalized h (T, D) -> gate, up (T, F) -> gate * up (T, F) -> ffn output (T, D)."""
    record(17, "normalized h", h)
    record(17, "w1", w1)
    record(17, "w3", w3)
    gate = record(17, "gate", F.silu(F.linear(h, w1)))  # (T, F)
    up = record(17, "up", F.linear(h, w3))  # (T, F)
    gated = record(17, "gate * up", gate * up)  # (T, F)
    record(17, "w2", w2)
    return parallel_linear(17, "ffn output", gated, w2)  # (T, D), all-reduced when w2 is split

"""Stages 15 and 18: the two residual additions of a transformer block."""
import torch

from .hooks import record


def add_attention_output(x: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """Stage 15. x (T, D) + attention output (T, D) -> h (T, D)."""
    record(15, "x", x)
    record(15, "attention output", attention_output)
    return record(15, "h", x + attention_output)


def add_ffn_output(h: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
    """Stage 18. h (T, D) + ffn output (T, D) -> out (T, D), the block's output."""
    record(18, "h", h)
    record(18, "ffn output", ffn_output)
    return record(18, "out", h + ffn_output)

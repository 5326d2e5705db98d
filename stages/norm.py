"""Stages 6 and 16: the two RMSNorms of a transformer block."""
import torch

from .hooks import record


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, as Meta's RMSNorm does.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def attention_prenorm(x: torch.Tensor, attention_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Stage 6. x (T, D) -> normalized x (T, D)."""
    record(6, "x", x)
    record(6, "attention_norm", attention_norm)
    return record(6, "normalized x", rms_norm(x, attention_norm, eps))


def ffn_prenorm(h: torch.Tensor, ffn_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """Stage 16. h (T, D) -> normalized h (T, D)."""
    record(16, "h", h)
    record(16, "ffn_norm", ffn_norm)
    return record(16, "normalized h", rms_norm(h, ffn_norm, eps))

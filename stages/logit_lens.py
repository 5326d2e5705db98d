"""The logit lens: stage 19's final RMSNorm and output head applied to the residual stream
after any layer, to read what the model would say if it stopped there."""
import torch
import torch.nn.functional as F

from .model import Model
from .norm import rms_norm


def logit_lens(model: Model, rows: torch.Tensor) -> torch.Tensor:
    """(N, D) rows of the residual stream -> (N, V) logits, float32, exactly as stage 19 makes them
    from the last block's output."""
    w = model.weights
    return F.linear(rms_norm(rows.to(model.device, model.dtype), w.norm, model.config.norm_eps), w.output).float()

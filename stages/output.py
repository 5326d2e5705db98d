"""Stage 19: the output head and the choice of the next token."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hooks import record
from .errors import UserError
from .norm import rms_norm
from .tensor_parallel import gathered_logits


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (always the highest logit)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise UserError(f"the temperature must be 0 (greedy) or positive, not {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 <= self.top_p <= 1):
            raise UserError(f"top-p must be from 0 to 1, not {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise UserError(f"top-k must be a whole number of at least 0, not {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise UserError(f"the seed must be a whole number from 0 to 2**64 - 1, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def next_token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(V) float32 logits -> (V) probabilities that sampling draws from: temperature,
    then only the top_k best tokens, then only the smallest set whose mass reaches top_p
    (never fewer than the best token)."""
    # In float64 and from the largest logit down, so that any temperature above 0, even 1e-300,
    # gives finite probabilities (the best token's becomes 1) instead of inf / inf.
    shifted = logits.double() - logits.max().double()
    probs = F.softmax(shifted / (sampling.temperature if not sampling.greedy else 1.0), dim=-1).float()
    if sampling.top_k > 0:
        kth_best = torch.topk(probs, min(sampling.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth_best, probs, 0.0)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token if the mass of the better tokens before it is still below top_p.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = mass_before < sampling.top_p * probs.sum()
        keep[0] = True  # top_p = 0 still leaves the best token
        sorted_probs = torch.where(keep, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs / probs.sum()


def forward_output(h: torch.Tensor, norm: torch.Tensor, output: torch.Tensor, eps: float,
                   sampling: Sampling, generator: torch.Generator | None) -> tuple[int | None, torch.Tensor]:
    """Stage 19. h (T, D), the last block's output (the trace calls it "out", as stage 18 does) -> final
    norm (T, D) -> last row · outputᵀ -> logits (V), float32 -> next id (None on the meta device, which
    computes shapes and no numbers)."""
    record(19, "out", h)
    record(19, "norm", norm)
    normalized = record(19, "normalized out", rms_norm(h, norm, eps))
    return choose_next(normalized, output, sampling, generator)


def choose_next(normalized: torch.Tensor, output: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None) -> tuple[int | None, torch.Tensor]:
    """The rest of stage 19: normalized out (T, D) -> last row · outputᵀ -> logits (V), float32 -> next id."""
    record(19, "output", output)
    logits = gathered_logits(normalized[-1], output)  # (V), float32; gathered when output is split
    if not logits.is_meta and not torch.isfinite(logits).all():
        raise UserError("the model computed logits that are not finite (inf or nan): its weights may be damaged, "
                        "or the dtype overflowed (try --dtype float32)")
    probs = record(19, "probs", next_token_probs(logits, sampling))  # (V)
    if sampling.greedy:
        next_id = torch.argmax(logits)
    else:
        # Draw on the CPU so that a seed gives the same tokens on every device.
        next_id = torch.multinomial(probs.cpu(), 1, generator=generator)[0]
    next_id = record(19, "next token", next_id)
    return None if next_id.is_meta else int(next_id), logits

"""Stage 19: the output head and the choice of the next token."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hooks import record
from .norm import rms_norm


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (always the highest logit)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def next_token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(V) float32 logits -> (V) probabilities that sampling draws from: temperature,
    then only the top_k best tokens, then only the smallest set whose mass reaches top_p."""
    probs = F.softmax(logits / (sampling.temperature if not sampling.greedy else 1.0), dim=-1)
    if sampling.top_k > 0:
        kth_best = torch.topk(probs, min(sampling.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth_best, probs, 0.0)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep a token if the mass of the better tokens before it is still below top_p.
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(mass_before < sampling.top_p * probs.sum(), sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs / probs.sum()


def forward_output(h: torch.Tensor, norm: torch.Tensor, output: torch.Tensor, eps: float,
                   sampling: Sampling, generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """Stage 19. h (T, D) -> final norm (T, D) -> last row · outputᵀ -> logits (V), float32 -> next id."""
    record(19, "h", h)
    record(19, "norm", norm)
    normalized = record(19, "normalized h", rms_norm(h, norm, eps))
    record(19, "output", output)
    logits = record(19, "logits", F.linear(normalized[-1], output).float())  # (V)
    probs = record(19, "probs", next_token_probs(logits, sampling))  # (V)
    if sampling.greedy:
        next_id = torch.argmax(logits)
    else:
        # Draw on the CPU so that a seed gives the same tokens on every device.
        next_id = torch.multinomial(probs.cpu(), 1, generator=generator)[0]
    return int(record(19, "next token", next_id)), logits

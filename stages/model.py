"""A loaded model: its config, its weights on a device, its tokenizer."""
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import ModelConfig
from .errors import UserError
from .rope import precompute_freqs_cis
from .tokenizer import Tokenizer
from .weights import Weights


@dataclass
class Model:
    name: str
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer | None
    source: str = ""  # the checkpoint's format, and the RoPE layout its wq/wk rows came in
    _freqs_cis: torch.Tensor | None = None  # (positions so far, Dh/2) complex64, on the weights' device
    _prepared: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, name: str, config: ModelConfig, weights: Weights, tokenizer: Tokenizer | None,
              device: torch.device, dtype: torch.dtype = torch.float32, source: str = "") -> "Model":
        return cls(name, config, weights.to(device, dtype, decoding=True), tokenizer, source)

    def rotations(self, end: int) -> torch.Tensor:
        """freqs_cis (end, Dh/2) for positions 0..end-1. The table grows to what runs need, not to
        the model's whole context (which a model file may claim to be millions of positions)."""
        if self._freqs_cis is None or self._freqs_cis.shape[0] < end:
            self._freqs_cis = precompute_freqs_cis(self.config.head_dim, end, self.config.rope_theta,
                                                   self.weights.rope_freqs).to(self.device)
        return self._freqs_cis[:end]

    def prepared(self, key: str, make: Callable[[], Any]) -> Any:
        """The weights in the form another implementation runs on (e.g. packed), made once per model."""
        if key not in self._prepared:
            self._prepared[key] = make()
        return self._prepared[key]

    @property
    def device(self) -> torch.device:
        return self.weights.tok_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.tok_embeddings.dtype


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when there is one), 'cpu' or 'cuda'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here (try --device cpu)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r} (choose auto, cpu or cuda)")
    return torch.device(name)

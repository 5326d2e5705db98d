"""Model hyper-parameters, as a frozen dataclass.

Notation used across the package (the same letters as ../STAGES.md):
T tokens fed this step, P positions already cached, D model dim, H query heads,
Hkv key/value heads, Dh head dim, F FFN hidden dim, V vocabulary size, L layers.
"""
import math
from dataclasses import dataclass, fields

# Far above any real LLaMA (Llama 3.1 405B: D=16384, L=126, V=128256, F=53248, 131072 positions), far
# below what would exhaust a machine before the first tensor is made: a file that claims more is lying.
LIMITS = {"dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10,
          "vocab_size": 1 << 22, "ffn_dim": 1 << 18, "max_seq_len": 1 << 24}


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # Hkv
    vocab_size: int  # V
    ffn_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # the context length the model was trained for

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in LIMITS:
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= LIMITS[f.name]:
                    raise ValueError(f"{f.name} must be a whole number from 1 to {LIMITS[f.name]}, not {value!r}")
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{f.name} must be a positive number, not {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"the head dimension {self.head_dim} is odd: RoPE rotates pairs")

    @property
    def head_dim(self) -> int:  # Dh
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


# Small enough to run in milliseconds, with GQA (2 query heads per KV head) so
# that tests exercise every code path of the real models.
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=160,
                   norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128)

"""The model's parameters, under Meta's names, in the shape torch.nn.Linear uses
(out_features, in_features)."""
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .config import ModelConfig

TALL = 2  # a weight with at least this many times as many rows as columns is tall (see for_decoding)


def is_tall(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[0] >= TALL * weight.shape[1]


def for_decoding(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) as it is or, where it is tall (the FFN's w1 and w3, the output head) and
    float32 on the CPU, the same (out, in) values stored column by column (strides (1, out)). A
    decode step multiplies one token's vector by every weight, and torch's float32 product on the
    CPU reads a tall weight 1.5-1.8× as fast laid out so (other shapes are as fast or slower:
    measured, README's Speed and memory). In float16 and bfloat16 it is 2-30× slower so, and on a
    GPU it is not measured: there a tall weight is stored row by row. The shape, the values and the
    formula stay the diagrams'; only the order of the sums changes."""
    if not is_tall(weight):
        return weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return weight.contiguous()  # (one read from the parsed copy comes column by column)
    if weight.stride() == (1, weight.shape[0]):
        return weight
    return weight.t().contiguous().t()  # (in, out) in memory, read as (out, in)


@dataclass
class LayerWeights:
    attention_norm: torch.Tensor  # (D)
    wq: torch.Tensor  # (H·Dh, D), rows in the interleaved-pair RoPE layout
    wk: torch.Tensor  # (Hkv·Dh, D), rows in the interleaved-pair RoPE layout
    wv: torch.Tensor  # (Hkv·Dh, D)
    wo: torch.Tensor  # (D, H·Dh)
    ffn_norm: torch.Tensor  # (D)
    w1: torch.Tensor  # (F, D) gate
    w3: torch.Tensor  # (F, D) up
    w2: torch.Tensor  # (D, F) down

    def each(self, change: Callable[[torch.Tensor], torch.Tensor]) -> "LayerWeights":
        return LayerWeights(**{f.name: change(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Weights:
    tok_embeddings: torch.Tensor  # (V, D)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (D)
    output: torch.Tensor  # (V, D); the same tensor as tok_embeddings when tied
    rope_freqs: torch.Tensor | None = None  # (Dh/2) float32 divisors of RoPE's frequencies (Llama 3.1 scaling)

    @property
    def tied(self) -> bool:
        """The output head is the embedding table itself (one tensor, one parameter)."""
        return self.output is self.tok_embeddings

    def each(self, change: Callable[[torch.Tensor], torch.Tensor]) -> "Weights":
        """`change` made to every weight, one at a time (a tied output head stays the embedding table)."""
        tok_embeddings = change(self.tok_embeddings)
        return Weights(tok_embeddings=tok_embeddings, layers=[layer.each(change) for layer in self.layers],
                       norm=change(self.norm), output=tok_embeddings if self.tied else change(self.output),
                       rope_freqs=self.rope_freqs)  # frequencies stay float32: they make the rotation table

    def to(self, device, dtype, decoding: bool = False) -> "Weights":
        """On `device` in `dtype` (stored as they were); with `decoding`, every tall weight that a product
        reads stored for it (see for_decoding), each as it is moved: one weight's copy at a time."""
        table = None if self.tied else self.tok_embeddings  # only looked up, by rows: left as it comes

        def moved(weight: torch.Tensor) -> torch.Tensor:
            placed = weight.to(device, dtype)  # (keeps the strides: a weight stored column by column stays so)
            return for_decoding(placed) if decoding and weight is not table else placed
        return self.each(moved)


def shapes_only_weights(config: ModelConfig, dtype: torch.dtype, tied: bool) -> Weights:
    """Weights of the config's shapes on torch's meta device: no memory, no values, so that the
    stages can run a model of any size to show its shapes."""
    c = config

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layers = [LayerWeights(attention_norm=empty(c.dim), wq=empty(q, c.dim), wk=empty(kv, c.dim), wv=empty(kv, c.dim),
                           wo=empty(c.dim, q), ffn_norm=empty(c.dim), w1=empty(c.ffn_dim, c.dim),
                           w3=empty(c.ffn_dim, c.dim), w2=empty(c.dim, c.ffn_dim))
              for _ in range(c.n_layers)]
    tok_embeddings = empty(c.vocab_size, c.dim)
    return Weights(tok_embeddings=tok_embeddings, layers=layers, norm=empty(c.dim),
                   output=tok_embeddings if tied else empty(c.vocab_size, c.dim))


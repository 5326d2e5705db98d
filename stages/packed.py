"""The same model as a serving engine runs it (vLLM, nano-vllm; seed 002): LlamaModel ->
LlamaDecoderLayer -> LlamaAttention / LlamaMLP. The computation of the 19 stages, regrouped:

- q, k and v come from one matmul with the packed weight qkv_proj, then are split (stage 8);
- gate and up come from one matmul with gate_up_proj, then SiluAndMul (stage 17);
- each residual addition is fused into the RMSNorm after it, the residual stream carried beside
  the hidden state: stage 15 with 16, stage 18 with stage 6 of the next layer (or with stage 19's
  final norm after the last layer);
- RoPE rotates halves (x[i], x[i+Dh/2]) ("neox" style) on wq/wk rows in Hugging Face's order;
- logits for the last position only.

The KV cache stays one (S, Hkv, Dh) tensor per layer: vLLM pages it into blocks, which puts the
same numbers elsewhere in memory.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import gguf_model, hf_folder, meta_folder
from .attention import attend, do_reshapings
from .config import ModelConfig
from .embedding import create_input_tensor
from .hooks import at, record
from .kv_cache import KVCache
from .model import Model
from .norm import attention_prenorm, rms_norm
from .output import Sampling, choose_next
from .rope import reorder
from .weights import LayerWeights, for_decoding

# vLLM's packed_modules_mapping, in Meta's names: each packed weight is these tensors' rows, in this order.
PACKED_MODULES = (("qkv_proj", ("wq", "wk", "wv")), ("gate_up_proj", ("w1", "w3")))


@dataclass(frozen=True)
class PackedPart:
    packed: str  # the packed weight
    rows: range | None  # the rows of it that this part fills (None: no model, symbolic shapes only)
    shape: str  # the part's symbolic shape
    name: str  # ours (Meta's)
    checkpoint_names: tuple[str, str, str]  # in layer N of a Meta folder, a Hugging Face folder, a GGUF file
    row_order: str  # "rotate-half": each head's rows in Hugging Face's order; "as stored"


def packed_parts(config: ModelConfig | None) -> list[PackedPart]:
    """Which checkpoint tensors make each packed weight, at which rows (of `config`'s model), in which row order."""
    c, parts = config, []
    shapes = {"wq": "(H·Dh, D)", "wk": "(Hkv·Dh, D)", "wv": "(Hkv·Dh, D)", "w1": "(F, D)", "w3": "(F, D)"}
    sizes = c and {"wq": c.n_heads * c.head_dim, "wk": c.n_kv_heads * c.head_dim, "wv": c.n_kv_heads * c.head_dim,
                   "w1": c.ffn_dim, "w3": c.ffn_dim}
    for packed, names in PACKED_MODULES:
        start = 0
        for name in names:
            order = "rotate-half" if name in ("wq", "wk") else "as stored"
            rows = range(start, start + sizes[name]) if sizes else None
            parts.append(PackedPart(packed, rows, shapes[name], name,
                                    (f"layers.N.{meta_folder.LAYER_TENSORS[name][0]}.weight",
                                     f"model.layers.N.{hf_folder.LAYER_TENSORS[name]}.weight",
                                     f"blk.N.{gguf_model.LAYER_TENSORS[name]}.weight"), order))
            start += sizes[name] if sizes else 0
    return parts


@dataclass
class PackedLayer:
    attention_norm: torch.Tensor  # (D); vLLM's input_layernorm
    qkv_proj: torch.Tensor  # ((H+2·Hkv)·Dh, D): wq's rows, wk's (both in rotate-half order), wv's
    wo: torch.Tensor  # (D, H·Dh); o_proj
    ffn_norm: torch.Tensor  # (D); post_attention_layernorm
    gate_up_proj: torch.Tensor  # (2·F, D): w1's rows, then w3's; stored column by column, as they are
    w2: torch.Tensor  # (D, F); down_proj


def pack_layer(layer: LayerWeights, head_dim: int) -> PackedLayer:
    """One layer's weights as a serving engine loads them: wq and wk rows put back in rotate-half
    order (as Hugging Face checkpoints store them), then the packed weights concatenated."""
    wq = reorder(layer.wq, head_dim, "rotate-half", dim=0)  # (H·Dh, D)
    wk = reorder(layer.wk, head_dim, "rotate-half", dim=0)  # (Hkv·Dh, D)
    return PackedLayer(attention_norm=layer.attention_norm, qkv_proj=torch.cat([wq, wk, layer.wv]), wo=layer.wo,
                       ffn_norm=layer.ffn_norm, gate_up_proj=for_decoding(torch.cat([layer.w1, layer.w3])), w2=layer.w2)


def calculate_qkv(x: torch.Tensor, qkv_proj: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """Stage 8, packed. normalized x (T, D) -> qkv (T, (H+2·Hkv)·Dh) -> split: xq (T, H·Dh), xk, xv (T, Hkv·Dh)."""
    record(8, "normalized x", x)
    record(8, "qkv_proj", qkv_proj)
    qkv = record(8, "qkv", F.linear(x, qkv_proj))  # (T, (H+2·Hkv)·Dh)
    xq, xk, xv = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return record(8, "xq", xq), record(8, "xk", xk), record(8, "xv", xv)


def cos_sin(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """freqs_cis (T, Dh/2) -> cos, sin (T, Dh): each pair's angle twice, for x[i] and x[i+Dh/2]."""
    cos, sin = freqs_cis.real, freqs_cis.imag  # (T, Dh/2)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., Dh) -> (-x[Dh/2:], x[:Dh/2]): each pair (x[i], x[i+Dh/2]) turned by a quarter."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotate(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (T, heads, Dh); cos, sin: (T, Dh), broadcast over heads. In float32, as the plain stage.
    xf = x.float()
    turned = record(10, f"{name} (rotate_half)", rotate_half(xf))  # (T, heads, Dh)
    return record(10, f"{name} (rotated)", (xf * cos[:, None, :] + turned * sin[:, None, :]).type_as(x))


def apply_rotary_embeddings(xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Stage 10, rotate-half layout. xq (T, H, Dh), xk (T, Hkv, Dh), cos, sin (T, Dh) ->
    x·cos + rotate_half(x)·sin, same shapes."""
    record(10, "xq (reshaped)", xq)
    record(10, "xk (reshaped)", xk)
    record(10, "cos", cos)
    record(10, "sin", sin)
    return _rotate("xq", xq, cos, sin), _rotate("xk", xk, cos, sin)


def attention(x: torch.Tensor, layer: PackedLayer, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor,
              start_pos: int, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Stage 7, packed: LlamaAttention. normalized x (T, D) -> attention output (T, D)."""
    record(7, "normalized x", x)
    xq, xk, xv = calculate_qkv(x, layer.qkv_proj, n_heads, n_kv_heads, head_dim)
    xq, xk, xv = do_reshapings(xq, xk, xv, head_dim)
    xq, xk = apply_rotary_embeddings(xq, xk, cos, sin)
    return record(7, "attention output", attend(xq, xk, xv, cache, start_pos, n_heads // n_kv_heads, layer.wo))


def silu_and_mul(h: torch.Tensor, gate_up_proj: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Stage 17, packed: LlamaMLP. normalized h (T, D) -> gate_up (T, 2·F) -> SiluAndMul:
    silu(first half) · second half (T, F) -> ffn output (T, D)."""
    record(17, "normalized h", h)
    record(17, "gate_up_proj", gate_up_proj)
    gate_up = record(17, "gate_up", F.linear(h, gate_up_proj))  # (T, 2·F)
    half = gate_up.shape[-1] // 2
    gated = record(17, "gate * up", F.silu(gate_up[:, :half]) * gate_up[:, half:])  # (T, F)
    record(17, "w2", w2)
    return record(17, "ffn output", F.linear(gated, w2))  # (T, D)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """x + residual (T, D) -> (its RMSNorm, the sum): one kernel in a serving engine, which carries
    the sum on as the residual stream."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def add_attention_output_and_norm(attention_output: torch.Tensor, residual: torch.Tensor, ffn_norm: torch.Tensor,
                                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 15 and 16 as one kernel. attention output, x (T, D) -> normalized h, h (T, D)."""
    record(15, "x", residual)
    record(15, "attention output", attention_output)
    normalized, h = fused_add_rms_norm(attention_output, residual, ffn_norm, eps)
    record(15, "h", h)
    record(16, "h", h)
    record(16, "ffn_norm", ffn_norm)
    return record(16, "normalized h", normalized), h


def add_ffn_output_and_norm(ffn_output: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, eps: float,
                            next_layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 18 of a layer and the norm after it as one kernel: stage 6 of `next_layer`, or stage 19's
    final norm after the last layer (None). ffn output, h (T, D) -> normalized out, out (T, D)."""
    record(18, "h", residual)
    record(18, "ffn output", ffn_output)
    normalized, out = fused_add_rms_norm(ffn_output, residual, norm, eps)
    record(18, "out", out)
    at(layer=next_layer)
    if next_layer is None:
        record(19, "out", out)
        record(19, "norm", norm)
        return record(19, "normalized out", normalized), out
    record(5, "x", out)
    record(6, "x", out)
    record(6, "attention_norm", norm)
    return record(6, "normalized x", normalized), out


def forward_through_blocks(x: torch.Tensor, layers: list[PackedLayer], caches: list[KVCache], cos: torch.Tensor,
                           sin: torch.Tensor, start_pos: int, model: Model) -> torch.Tensor:
    """Stage 5, packed: LlamaModel's layers and its final norm. x (T, D) -> normalized out (T, D)."""
    c = model.config
    at(layer=0)
    residual = record(5, "x", x)  # the first layer's input is the residual stream's start
    x = attention_prenorm(x, layers[0].attention_norm, c.norm_eps)
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        x = attention(x, layer, cache, cos, sin, start_pos, c.n_heads, c.n_kv_heads, c.head_dim)
        x, residual = add_attention_output_and_norm(x, residual, layer.ffn_norm, c.norm_eps)
        x = silu_and_mul(x, layer.gate_up_proj, layer.w2)
        last = i == len(layers) - 1
        x, residual = add_ffn_output_and_norm(x, residual, model.weights.norm if last else layers[i + 1].attention_norm,
                                              c.norm_eps, None if last else i + 1)
    return x


def forward_step(model: Model, tokens: torch.Tensor, start_pos: int, caches: list[KVCache],
                 sampling: Sampling, generator: torch.Generator | None) -> tuple[int | None, torch.Tensor]:
    """tokens[P:P+T] (T) -> (next id, logits (V)) as a serving engine computes them: stages 4, 5
    (its layers, ending in the final norm) and the rest of 19."""
    layers = model.prepared("packed", lambda: [pack_layer(layer, model.config.head_dim)
                                               for layer in model.weights.layers])
    x = create_input_tensor(tokens, model.weights.tok_embeddings)  # (T, D)
    cos, sin = cos_sin(model.rotations(start_pos + tokens.shape[0])[start_pos:])  # (T, Dh) each
    normalized = forward_through_blocks(x, layers, caches, cos, sin, start_pos, model)  # (T, D)
    return choose_next(normalized, model.weights.output, sampling, generator)

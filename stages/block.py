"""Stage 5: the stack of transformer blocks, and one block as the two residual
branches x + attention(norm(x)), h + ffn(norm(h))."""
import torch

from .attention import attention
from .config import ModelConfig
from .feedforward import feed_forward
from .hooks import at, record
from .kv_cache import KVCache
from .norm import attention_prenorm, ffn_prenorm
from .residual import add_attention_output, add_ffn_output
from .weights import LayerWeights


def transformer_block(x: torch.Tensor, layer: LayerWeights, cache: KVCache | None, freqs_cis: torch.Tensor,
                      start_pos: int, config: ModelConfig) -> torch.Tensor:
    """Stages 6 to 18 for one layer. x (T, D) -> out (T, D)."""
    attention_output = attention(attention_prenorm(x, layer.attention_norm, config.norm_eps), layer, cache,
                                 freqs_cis, start_pos, config.head_dim, config.n_rep)
    h = add_attention_output(x, attention_output)
    ffn_output = feed_forward(ffn_prenorm(h, layer.ffn_norm, config.norm_eps), layer.w1, layer.w3, layer.w2)
    return add_ffn_output(h, ffn_output)


def forward_through_blocks(x: torch.Tensor, layers: list[LayerWeights], caches: list[KVCache | None],
                           freqs_cis: torch.Tensor, start_pos: int, config: ModelConfig) -> torch.Tensor:
    """Stage 5. x (T, D) through the L blocks in turn -> (T, D)."""
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        at(layer=i)
        x = transformer_block(record(5, "x", x), layer, cache, freqs_cis, start_pos, config)
    at(layer=None)
    return x

"""One pass of the model over the tokens of a step: stages 4, 5 and 19."""
import torch

from .block import forward_through_blocks
from .embedding import create_input_tensor
from .kv_cache import KVCache
from .model import Model
from .output import Sampling, forward_output


def forward_step(model: Model, tokens: torch.Tensor, start_pos: int, caches: list[KVCache],
                 sampling: Sampling, generator: torch.Generator | None) -> tuple[int | None, torch.Tensor]:
    """tokens[P:P+T] (T) -> (next id, logits (V)): stages 4, 5 and 19."""
    config, weights = model.config, model.weights
    x = create_input_tensor(tokens, weights.tok_embeddings)  # (T, D)
    # This step's rows of the model's table, as a tensor of their own: what a trace keeps of them.
    freqs_cis = model.rotations(start_pos + tokens.shape[0])[start_pos:].clone()  # (T, Dh/2)
    h = forward_through_blocks(x, weights.layers, caches, freqs_cis, start_pos, config)  # (T, D)
    return forward_output(h, weights.norm, weights.output, config.norm_eps, sampling, generator)

"""Stage 4: from token ids to vectors."""
import torch

from .hooks import record
from .tensor_parallel import embedding


def create_input_tensor(tokens: torch.Tensor, tok_embeddings: torch.Tensor) -> torch.Tensor:
    """Stage 4. tokens[P:P+T] (T) ids, tok_embeddings (V, D) -> x (T, D): row i of the table for id i
    (split over the ranks of a tensor-parallel run: stages.tensor_parallel.embedding)."""
    record(4, "tokens[P:P+T]", tokens)
    record(4, "tok_embeddings", tok_embeddings)
    return embedding(tokens, tok_embeddings)

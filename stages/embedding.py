"""Stage 4: from token ids to vectors."""
import torch
import torch.nn.functional as F

from .hooks import record


def create_input_tensor(tokens: torch.Tensor, tok_embeddings: torch.Tensor) -> torch.Tensor:
    """Stage 4. tokens[P:P+T] (T) ids, tok_embeddings (V, D) -> x (T, D): row i of the table for id i."""
    record(4, "tokens[P:P+T]", tokens)
    record(4, "tok_embeddings", tok_embeddings)
    return record(4, "x", F.embedding(tokens, tok_embeddings))

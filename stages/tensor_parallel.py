"""Tensor parallelism as Meta's model.py runs it (fairscale's model-parallel layers; seeds 001, 003).

N ranks, one process each, joined by torch.distributed; every rank holds a slice of every large
weight and runs the same stage functions on it:

- wq, wk, wv, w1, w3 are ColumnParallelLinear: rank r holds a slice of their output rows (its own
  H/N query heads, Hkv/N key/value heads, F/N FFN columns), so stages 8 to 13 and the gate and up of
  stage 17 run on the rank's heads and columns with no communication at all;
- wo and w2 are RowParallelLinear: rank r holds the matching slice of their input columns, so its
  product is a partial sum of the result; an all-reduce adds the N partial sums;
- the embedding is VocabParallelEmbedding: rank r holds V/N rows of the table, looks up the ids that
  fall in its rows (zeros for the others), and an all-reduce adds the N lookups;
- the output head is ColumnParallelLinear gathering its output: rank r computes the logits of its
  V/N tokens, and an all-gather puts the vocabulary back together on every rank.

Norm weights are small and every rank holds them whole. The stage functions ask `parallel_linear`,
`embedding` and `gathered_logits` for the products above: without an active shard they are the
single-process products, so the plain run is this code with N = 1.
"""
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UserError
from .hooks import record
from .weights import LayerWeights, Weights, for_decoding, is_tall

# Which dimension of each weight is split over the ranks: 0, its output rows (column-parallel);
# 1, its input columns (row-parallel). The rest are held whole by every rank.
SPLIT_DIM = {"tok_embeddings": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}
ALL_REDUCE = "all-reduce: sum over the ranks"
ALL_GATHER = "all-gather: the ranks' slices side by side"
MAX_RANKS = 64  # far more processes than one machine runs for a model of our size


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def part(self, size: int) -> range:
        """This rank's slice of a dimension of `size` (which `check_divisible` has checked)."""
        n = size // self.world
        return range(self.rank * n, (self.rank + 1) * n)


_shard: Shard | None = None  # set while this process runs as one rank of a tensor-parallel model


def check_divisible(config: ModelConfig, world: int) -> None:
    """Each rank must get whole heads, whole FFN columns and whole vocabulary rows, as in Meta's code."""
    sizes = (("query heads H", config.n_heads), ("key/value heads Hkv", config.n_kv_heads),
             ("FFN columns F", config.ffn_dim), ("vocabulary rows V", config.vocab_size))
    for what, size in sizes:
        if size % world:
            fits = [n for n in range(1, min(config.n_heads, config.n_kv_heads) + 1)
                    if all(s % n == 0 for _, s in sizes)]
            raise UserError(f"--tp {world}: the model's {size} {what} do not split evenly over {world} ranks "
                            f"(it splits over {', '.join(map(str, fits))}; key/value heads are not replicated, "
                            f"as in Meta's model.py)")


def shard_weights(weights: Weights, shard: Shard) -> Weights:
    """The slices of `weights` that rank `shard.rank` holds (SPLIT_DIM), as tensors of their own: stored
    row by row, or column by column where the slice is tall (stages.weights.for_decoding)."""
    def part(name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in SPLIT_DIM:
            return w
        dim = SPLIT_DIM[name]
        rows = shard.part(w.shape[dim])
        sliced = w.narrow(dim, rows.start, len(rows))
        return for_decoding(sliced) if is_tall(sliced) else sliced.contiguous()

    layers = [LayerWeights(**{name: part(name, w) for name, w in vars(layer).items()}) for layer in weights.layers]
    tok_embeddings = part("tok_embeddings", weights.tok_embeddings)
    tied = weights.tied
    return replace(weights, tok_embeddings=tok_embeddings, layers=layers,
                   output=tok_embeddings if tied else part("output", weights.output))


def set_shard(shard: Shard | None) -> None:
    """Run the stage functions as rank `shard.rank` of `shard.world` (None: as a single process).
    torch.distributed's default process group must be initialised for N > 1."""
    global _shard
    _shard = shard if shard is not None and shard.world > 1 else None


def current() -> Shard | None:
    """The shard this process runs as, if it is one rank of a tensor-parallel run."""
    return _shard


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    total = t.clone()  # the partial sum stays as it was recorded
    dist.all_reduce(total)
    return total


def parallel_linear(stage: int, name: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ, recorded as `name` of `stage`. Where w is a row-parallel slice (its input columns), the
    rank's product is recorded as `name (partial)` and the all-reduced sum as `name`."""
    y = F.linear(x, w)
    if _shard is None:
        return record(stage, name, y)
    record(stage, f"{name} (partial)", y)
    return record(stage, name, _all_reduce(y))


def embedding(tokens: torch.Tensor, tok_embeddings: torch.Tensor) -> torch.Tensor:
    """Stage 4's lookup. tokens (T), tok_embeddings (V, D) -> x (T, D). Vocabulary-parallel, the
    table is the rank's V/N rows: ids outside them look up zeros, and the all-reduce adds the ranks'
    lookups, in which each id was found by exactly one rank."""
    if _shard is None:
        return record(4, "x", F.embedding(tokens, tok_embeddings))
    rows = _shard.part(tok_embeddings.shape[0] * _shard.world)
    outside = (tokens < rows.start) | (tokens >= rows.stop)  # (T)
    local = torch.where(outside, 0, tokens - rows.start)  # (T): ids as rows of this rank's slice
    x = F.embedding(local, tok_embeddings).masked_fill(outside[:, None], 0.0)  # (T, D)
    record(4, "x (partial)", x)
    return record(4, "x", _all_reduce(x))


def gathered_logits(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Stage 19's head. x (D), output (V, D) -> logits (V), float32. With the head split by vocabulary
    rows, the rank's (V/N) logits are recorded as `logits (slice)` and all-gathered in rank order."""
    logits = F.linear(x, output).float()  # (V) or (V/N)
    if _shard is None:
        return record(19, "logits", logits)
    record(19, "logits (slice)", logits)
    slices = [torch.empty_like(logits) for _ in range(_shard.world)]
    dist.all_gather(slices, logits)
    return record(19, "logits", torch.cat(slices))  # (V)

"""The 19 stages as one rank of a tensor-parallel run shows them (stages.tensor_parallel): the plain
registry with each sliced dimension divided by N, the ranks, and the collectives named as operations."""
import re
from dataclasses import replace

from .registry import STAGES, Stage, TensorSpec, check, op, spec
from .tensor_parallel import ALL_GATHER, ALL_REDUCE

# The stages that run on the rank's own heads (8 to 14) and FFN columns (17).
_PER_RANK = {8, 9, 10, 11, 12, 13, 14, 17}
_SLICED = re.compile(r"\b(Hkv|H|F)\b")


def _rank_shape(t: TensorSpec) -> TensorSpec:
    """H, Hkv and F in the shape become the rank's H/N, Hkv/N and F/N."""
    return replace(t, shape=_SLICED.sub(r"\1/N", t.shape))


def _rank_view(s: Stage) -> Stage:
    return replace(s, tensors=tuple(map(_rank_shape, s.tensors))) if s.number in _PER_RANK else s


def _insert_before(s: Stage, name: str, *new: TensorSpec) -> tuple[TensorSpec, ...]:
    i = [t.name for t in s.tensors].index(name)
    return s.tensors[:i] + new + s.tensors[i:]


def _with_weight(s: Stage, name: str, shape: str) -> tuple[TensorSpec, ...]:
    return tuple(replace(t, shape=shape) if t.name == name else t for t in s.tensors)


def _collective_stages(stages: tuple[Stage, ...]) -> dict[int, dict]:
    s4, s14, s17, s19 = (stages[n - 1] for n in (4, 14, 17, 19))
    s4_tensors = _with_weight(s4, "tok_embeddings", "(V/N, D)")
    s19_tensors = _with_weight(s19, "output", "(V/N, D)")
    return {
        4: dict(explanation=s4.explanation + " Each rank holds V/N rows of the table (VocabParallelEmbedding): "
                                             "it looks up the ids that fall in its rows and gives zeros for the "
                                             "others; the all-reduce adds the ranks' lookups.",
                tensors=_insert_before(replace(s4, tensors=s4_tensors), "x", spec("mid", "x (partial)", "(T, D)")),
                ops=(op("look up this rank's rows, zeros elsewhere", ("tokens[P:P+T]", "tok_embeddings"),
                        "x (partial)"), op(ALL_REDUCE, "x (partial)", "x"))),
        14: dict(explanation=s14.explanation + " wo is split by its input columns (RowParallelLinear): each rank "
                                               "multiplies its own heads' outputs and gets a partial sum of the "
                                               "attention output; the all-reduce adds the N partial sums.",
                 tensors=_insert_before(s14, "attention output", spec("mid", "attention output (partial)", "(T, D)")),
                 ops=(*s14.ops[:-1], op("· woᵀ (this rank's columns)", ("heads merged", "wo"),
                                        "attention output (partial)"),
                      op(ALL_REDUCE, "attention output (partial)", "attention output"))),
        17: dict(explanation=s17.explanation + " w1 and w3 are split by their output rows, w2 by its input "
                                               "columns: each rank computes F/N of the hidden units and a "
                                               "partial sum of the FFN output; the all-reduce adds them.",
                 tensors=_insert_before(s17, "ffn output", spec("mid", "ffn output (partial)", "(T, D)")),
                 ops=(*s17.ops[:-1], op("· w2ᵀ (this rank's columns)", ("gate * up", "w2"), "ffn output (partial)"),
                      op(ALL_REDUCE, "ffn output (partial)", "ffn output"))),
        19: dict(explanation=s19.explanation + " The output head is split by vocabulary rows: each rank "
                                               "computes the logits of its V/N tokens, and the all-gather puts "
                                               "the vocabulary together on every rank, which all choose the "
                                               "same token.",
                 tensors=_insert_before(replace(s19, tensors=s19_tensors), "logits",
                                        spec("mid", "logits (slice)", "(V/N)")),
                 ops=(s19.ops[0], op("last row · outputᵀ, float32 (this rank's rows)", ("normalized out", "output"),
                                     "logits (slice)"), op(ALL_GATHER, "logits (slice)", "logits"), *s19.ops[2:])),
    }


_RANK_STAGES = tuple(map(_rank_view, STAGES))
_CHANGED = _collective_stages(_RANK_STAGES)
TENSOR_PARALLEL_STAGES = check(tuple(replace(s, **_CHANGED.get(s.number, {})) for s in _RANK_STAGES))

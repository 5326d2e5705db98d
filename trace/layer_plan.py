"""How a layer's records are made, learned from the first layer of a step and applied to the rest.

Every block of a step shows the same tensors, in the same order, with the same shapes, and the
same ones share memory (a reshape is a view of the matmul before it, a stage's output is the next
stage's input). Where a step and layer keep no values, the recorder only notes each record's
arguments while the block runs (see Recorder.at) and makes the records when the block is done:
the first block of the step the ordinary way, one record at a time, from which a `LayerPlan` is
learned; every later block with the same records through that plan, which knows without asking
which tensors to summarise, which share statistics with an earlier one, and which records are
weights. This leaves out the per-record work that made a traced decode step ~40% slower.
"""
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

import torch

from stages.training_stages import UPDATE, WEIGHT_GRAD

from .sums import Later

# A record's arguments as the recorder notes them: (stage, name, tensor, copy, shape, lasting).
Call = tuple[int, str, torch.Tensor, bool, "tuple[int, ...] | None", bool]
signature_of = itemgetter(0, 1)  # what must be equal for two blocks to share a plan: the stages and names, in order


@dataclass(frozen=True, slots=True)
class LayerPlan:
    fixed: tuple[tuple, ...]  # per record: (stage, name, role, symbolic, dtype, shape)
    weights: tuple[int, ...]  # records of weights: their statistics are kept per weight (Recorder._weight)
    batched: tuple[tuple[int, tuple], ...]  # (record, its group: shape, dtype, device) for the step's batched pass
    batched_numel: int
    alone: tuple[int, ...]  # summarised on their own, now (more than BATCHED_NUMEL elements)
    asked: tuple[int, ...]  # asked of Recorder._statistics as usual (the lasting KV cache, repetitions)
    shared: tuple[tuple[int, int], ...]  # (record, the earlier record whose statistics it shows)


class Planned(NamedTuple):
    """The records of one block made through `plan`, with their statistics: made into TensorRecords
    when the recorder's records are asked for, after the run."""
    plan: LayerPlan
    sums: list
    step: int
    layer: int


def learn(records: list, calls: list[Call]) -> LayerPlan | None:
    """The plan of a block, from the records the recorder made of its calls the ordinary way
    (None where a block cannot be replayed: shapes only, copies, a training step's records)."""
    if len(records) != len(calls) or any(call[3] or call[2].is_meta for call in calls):
        return None
    fixed, weights, batched, alone, asked, shared = [], [], [], [], [], []
    first: dict[int, int] = {}  # id(statistics) -> the first record that showed them
    numel = 0
    for i, (record, (_, _, tensor, _, _, lasting)) in enumerate(zip(records, calls, strict=True)):
        fixed.append((record.stage, record.name, record.role, record.symbolic, record.dtype, record.shape))
        sums = record._sums
        if record.role == "weight":
            weights.append(i)
        elif record.role in (WEIGHT_GRAD, UPDATE) or record._values is not None:
            return None
        elif sums is None:  # (no elements)
            continue
        elif (j := first.setdefault(id(sums), i)) != i:
            shared.append((i, j))
        elif lasting or type(sums) is not Later:
            asked.append(i)
        elif sums._tensor is tensor:
            batched.append((i, (tensor.shape, tensor.dtype, tensor.device)))
            numel += tensor.numel()
        elif sums._tensor is None and 0 not in tensor.stride():
            alone.append(i)
        else:  # (a repetition summarised as one copy)
            asked.append(i)
    return LayerPlan(tuple(fixed), tuple(weights), tuple(batched), numel, tuple(alone), tuple(asked), tuple(shared))

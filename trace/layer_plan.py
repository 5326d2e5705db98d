"""How a layer's records are made, learned from the first layer of a step and applied to the rest.

Every block of a step shows the same tensors, in the same order, with the same shapes, and the
same ones share memory (a reshape is a view of the matmul before it, a stage's output is the next
stage's input). Where a step and layer keep no values, the recorder only has each call noted while
the block runs (stages.hooks.note_into) and makes the records when the block is done: the first
block of the step the ordinary way, one record at a time, from which a `LayerPlan` is learned;
every later block with the same records through that plan, which knows without asking which
tensors to summarise, which share statistics with an earlier one, and which records are weights
(where a block's shapes, dtypes and shared memory are those of the first: see LayerPlan.fits).
That work is done at the step's end for all blocks at once, where the tensors are small (a decode
step), and the records themselves are made after the run. A traced decode step with the default
capture took ~22 ms more than an untraced one (~45 ms) when each record was made as it came; ~10-14 ms now.
"""
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

import torch

from stages.training_stages import UPDATE, WEIGHT_GRAD

from .sums import Later, group_key

# A record's arguments as the recorder notes them: (stage, name, tensor, copy, shape, lasting).
Call = tuple[int, str, torch.Tensor, bool, "tuple[int, ...] | None", bool]
signature_of = itemgetter(0, 1)  # what must be equal for two blocks to share a plan: the stages and names, in order


@dataclass(frozen=True, slots=True)
class LayerPlan:
    fixed: tuple[tuple, ...]  # per record: (stage, name, role, symbolic, dtype, shape)
    weights: tuple[int, ...]  # records of weights: their statistics are kept per weight (Recorder._weight)
    batched: tuple[tuple[tuple, tuple[int, ...]], ...]  # (group_key, records) of the step's batched pass
    batched_numel: int
    alone: tuple[int, ...]  # summarised on their own, now (more than BATCHED_NUMEL elements)
    asked: tuple[int, ...]  # asked of Recorder._statistics as usual (the lasting KV cache, repetitions)
    shared: tuple[tuple[int, int], ...]  # (record, the earlier record whose statistics it shows)
    empty: tuple[int, ...]  # records of no elements: no statistics
    kinds: tuple[tuple[int, tuple], ...]  # (record, group_key) of the weights, alone and asked, to check

    def fits(self, calls: list[Call]) -> bool:
        """Whether a block with this plan's stages and names also has its shapes, dtypes and shared
        memory, as the blocks of one model's step do (a block that does not is recorded one record at
        a time: its numbers are never taken from another block's plan)."""
        for key, group in self.batched:
            for i in group:
                if group_key(calls[i][2]) != key:
                    return False
        for i, key in self.kinds:
            if group_key(calls[i][2]) != key:
                return False
        for i, j in self.shared:
            if calls[i][2].data_ptr() != calls[j][2].data_ptr():
                return False
        return all(calls[i][2].numel() == 0 for i in self.empty)


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
    fixed, weights, alone, asked, shared, empty = [], [], [], [], [], []
    batched: dict[tuple, list[int]] = {}
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
            empty.append(i)
        elif (j := first.setdefault(id(sums), i)) != i:
            shared.append((i, j))
        elif lasting or type(sums) is not Later:
            asked.append(i)
        elif sums._tensor is tensor:
            batched.setdefault(group_key(tensor), []).append(i)
            numel += tensor.numel()
        elif sums._tensor is None and 0 not in tensor.stride():
            alone.append(i)
        else:  # (a repetition summarised as one copy)
            asked.append(i)
    kinds = tuple((i, group_key(calls[i][2])) for i in (*weights, *alone, *asked))
    return LayerPlan(tuple(fixed), tuple(weights), tuple((key, tuple(group)) for key, group in batched.items()),
                     numel, tuple(alone), tuple(asked), tuple(shared), tuple(empty), kinds)

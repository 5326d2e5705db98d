"""The one narrow point through which the forward pass is recorded.

Stage functions hand each tensor they show to `record`; the loops say where
they are with `at`. Without an active sink both are a single `is None` test,
so the model runs at full speed when nobody is tracing. Whoever wants the
tensors (the `trace` package) installs a sink with `recording`.
"""
from contextlib import contextmanager
from typing import Protocol

import torch


class Sink(Protocol):
    def at(self, **where: int | None) -> None: ...
    def record(self, stage: int, name: str, tensor: torch.Tensor, copy: bool, shape: tuple[int, ...] | None,
               lasting: bool) -> None: ...


_sink: Sink | None = None
_notes: list | None = None  # where the sink asked for the calls to be noted instead (see note_into)


def record(stage: int, name: str, tensor: torch.Tensor, copy: bool = False,
           shape: tuple[int, ...] | None = None, lasting: bool = False) -> torch.Tensor:
    """Show `tensor` as `name` of stage `stage`; returns it unchanged.

    `copy=True` is for buffers that are later written in place (the tokens):
    the sink must keep a snapshot, not a reference; the numbers of any other
    tensor may be read as late as the end of the step. `shape` is the shape the
    diagram shows where `tensor` holds it with one dimension split in two (the
    keys repeated for grouped-query attention, a view that a reshape would copy).
    `lasting=True` promises the opposite of `copy`: nothing ever writes these numbers again (the
    filled part of the KV cache, which later steps extend but never overwrite), so a sink that has
    summarised the start of this memory need only look at what lies beyond it.
    """
    if _sink is not None:
        if _notes is not None and not copy:
            _notes.append((stage, name, tensor, copy, shape, lasting))
        else:
            _sink.record(stage, name, tensor, copy, shape, lasting)
    return tensor


def at(**where: int | None) -> None:
    """Tell the sink which step / layer the following records belong to."""
    if _sink is not None:
        _sink.at(**where)


def note_into(notes: list | None) -> None:
    """For the sink: until it says None, append each call's arguments to `notes` instead of calling
    its `record` (the cheapest thing a call can do; ~2,000 a step), except copies, which it must see
    while their values are still those shown. The sink takes the notes up at its next `at` or copy."""
    global _notes
    _notes = notes


def active() -> bool:
    """Whether a sink is listening: work done only to be shown (a copy to diff against) is skipped otherwise."""
    return _sink is not None


@contextmanager
def recording(sink: Sink):
    global _sink, _notes
    previous, _sink, notes, _notes = _sink, sink, _notes, None
    try:
        yield sink
    finally:
        _sink, _notes = previous, notes

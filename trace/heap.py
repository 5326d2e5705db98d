"""The process's heap while a trace records.

Memory the process freed is given back to the system: glibc keeps freed memory in its heap for
reuse, and the large tensors of a training step (gradients, logits) leave it in pieces that the
next step cannot reuse: without this the process grew by ~60-100 MB a step.

And the objects that existed before a run are kept out of the garbage collector's way: a traced
run makes some 2,000 records a step, which sets off full collections, and each of them walked every
object of torch and the model again (a sixth of a traced decode step's time, measured).
"""
import ctypes
import ctypes.util
import gc
from contextlib import contextmanager


def _trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _trim()


def give_back_freed_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def old_objects_frozen():
    """Within it, the collector looks only at the objects made since it began (the trace's, the
    run's); they are all collected as usual. Someone else's freeze (a server's, say) is left alone."""
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


@contextmanager
def collections_paused():
    """Within it, the collector does not run on its own. For generation: a traced run makes tens of
    thousands of records and no reference cycle at all (none in a traced run of 32 steps, measured
    with gc.DEBUG_SAVEALL), so every collection is wasted work (~4% of a traced run, measured).
    Not for training, whose autograd hooks could hold cycles. Restores what it found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

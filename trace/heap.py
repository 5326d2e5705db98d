"""The process's heap while a trace records.

Memory the process freed is given back to the system: glibc keeps freed memory in its heap for
reuse, and the large tensors of a training step (gradients, logits) leave it in pieces that the
next step cannot reuse: without this the process grew by ~60-100 MB a step.

And the objects that existed before a run are kept out of the garbage collector's way: a traced
run makes some 2,000 records a step, which sets off full collections, and each of them walked every
object of torch and the model again (a sixth of a traced decode step's time, measured). A traced
generation, which makes no reference cycle, pauses the collector altogether, and has memory freed
at the end of a step kept for the next (see keep_freed_memory).
"""
import ctypes
import gc
from contextlib import contextmanager


def _glibc(function: str):
    # The process's own symbols, which hold the C library's: ctypes.util.find_library would run
    # ldconfig in a child process at every import.
    try:
        return getattr(ctypes.CDLL(None), function)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # (glibc's malloc.h)


def give_back_freed_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def keep_freed_memory() -> bool:
    """glibc gives memory back to the system as soon as 128 KiB lie free at the top of its heap, and
    serves blocks of 128 KiB or more with a mapping of their own, unmapped when freed. A traced step
    holds its small tensors until the step's batched statistics and frees them together, so the next
    step took the same memory again page by page: ~23,000 page faults in a traced run of 32 steps
    (~0.1 s), ~1,800 with memory up to these sizes kept for reuse (measured; the untraced run has none
    either way, and the peak memory is the same). For the whole process, from the first traced run on:
    glibc cannot tell the settings it had. Blocks above 4 MiB (a training step's logits) still get a
    mapping of their own, and training gives memory back itself (give_back_freed_memory).
    False where the C library is not glibc."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_TRIM_THRESHOLD, 64 << 20) and _MALLOPT(M_MMAP_THRESHOLD, 4 << 20))


@contextmanager
def generation_heap():
    """The process's heap and collector as a traced generation wants them: objects made before it left
    out of the collector's passes, no automatic collection within it, freed memory kept for reuse."""
    keep_freed_memory()
    with old_objects_frozen(), collections_paused():
        yield


_freezes = 0  # how many old_objects_frozen are open: only the outermost freezes and unfreezes


@contextmanager
def old_objects_frozen():
    """Within it, the collector looks only at the objects made since it began (the trace's, the
    run's); they are all collected as usual. Someone else's freeze (a server's, say) is left alone.
    One within another (the records made at a run's end) is free: gc.get_freeze_count walks every
    frozen object (~20 ms for torch's and the model's), so it is asked only where none is open."""
    global _freezes
    ours = _freezes == 0 and gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    _freezes += 1
    try:
        yield
    finally:
        _freezes -= 1
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

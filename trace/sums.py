"""Summary statistics of tensors, cheap enough to take of every tensor a run shows.

A tensor is summarised by four reductions (min, max, sum, L2 norm) while the run goes on; mean and
standard deviation are made from them when first shown. Small tensors wait for one batched pass
per step (`Later`), and the KV cache, which every step shows whole, is summarised piece by piece
as it grows (`Joined`).
"""
import math

import torch

# A tensor's (min, max, sum, L2 norm) as a (4) tensor, still on its device, and how many numbers
# they summarise. Four reductions and nothing else during the run: mean and standard deviation
# are made from them when first shown (a dozen small operations per tensor, ~2,000 tensors per
# step, would cost more than the reductions themselves).
# Batched statistics are held as a plain list of the four numbers (one transfer for the whole batch).
Sums = tuple[torch.Tensor | list[float], int]


def _summed(t: torch.Tensor) -> torch.Tensor:
    """`t` as real numbers that sum accurately: complex as pairs, integers as float64, halves as float32.
    A weight stored column by column (stages.weights.for_decoding) is read in its memory's order:
    the statistics are those of the same numbers, and torch.aminmax would copy it first."""
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        t = t.t()
    real = torch.view_as_real(t) if t.is_complex() else t
    if not real.is_floating_point():
        return real.double()
    return real.float() if real.itemsize < 4 else real


def sums_of(t: torch.Tensor) -> Sums | None:
    if t.numel() == 0:
        return None
    real = _summed(t)
    lo, hi = torch.aminmax(real)
    # A sum and a norm are one fast pass each; torch.std_mean and float64 accumulation are ten times
    # slower, and the trace must stay cheap.
    return torch.stack([lo, hi, real.sum(), _norm(real)]), real.numel()


NORM_ROW = 4096  # the norm of a larger tensor is taken by rows of this many numbers, then of their norms


def _norm(real: torch.Tensor) -> torch.Tensor:
    """The L2 norm, as accurate as the sum's pairwise accumulation: over tens of millions of numbers
    (the output head), torch's float32 vector_norm drifts by 2e-3 (the std shown moved in its third
    digit), by rows it stays within 1e-7, and it is no slower."""
    if real.numel() <= 16 * NORM_ROW:
        return torch.linalg.vector_norm(real)
    flat = real.reshape(-1)
    whole = flat.numel() // NORM_ROW * NORM_ROW
    return torch.linalg.vector_norm(torch.cat([torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1),
                                               flat[whole:]]))


class Later:
    """Statistics that the records of one memory share, computed now or later: small tensors wait
    for their step's batched pass (holding the tensor until then; asked for sooner, or pickled, it
    is summarised alone). A pickled one travels as its statistics."""
    __slots__ = ("_tensor", "_sums")

    def __init__(self, tensor: torch.Tensor | None, sums: Sums | None = None):
        self._tensor, self._sums = tensor, sums

    def sums(self) -> Sums | None:
        if self._tensor is not None:
            self.done(sums_of(self._tensor))
        return self._sums

    def done(self, sums: Sums | None) -> None:
        self._sums, self._tensor = sums, None

    def __reduce__(self):
        return Later, (None, self.sums())


class Joined(Later):
    """The statistics of two pieces of memory together: the part of the KV cache that earlier steps
    filled (already summarised) and the positions this step wrote (see Recorder._lasting)."""
    __slots__ = ("_parts",)

    def __init__(self, first: Later, second: Later):
        super().__init__(None)
        self._parts: tuple[Later, Later] | None = (first, second)

    def sums(self) -> Sums | None:
        unfinished = [self]  # (asked before the step's pass, earlier steps' may wait too: a loop, not recursion)
        while unfinished[-1]._parts is not None and isinstance(earlier := unfinished[-1]._parts[0], Joined):
            unfinished.append(earlier)
        for joined in reversed(unfinished):  # the earliest first
            if joined._parts is not None:
                first, second = joined._parts
                joined.done(_joined(first.sums(), second.sums()))
                joined._parts = None
        return self._sums


def _joined(a: Sums | None, b: Sums | None) -> Sums | None:
    """(min, max, sum, L2 norm) of two pieces from each one's."""
    if a is None or b is None:
        return a or b
    (lo_a, hi_a, total_a, norm_a), (lo_b, hi_b, total_b, norm_b) = (
        s[0] if isinstance(s[0], list) else s[0].tolist() for s in (a, b))
    nan = lo_a != lo_a or lo_b != lo_b  # (min and max of Python floats would drop a NaN)
    return ([math.nan if nan else min(lo_a, lo_b), math.nan if nan else max(hi_a, hi_b), total_a + total_b,
             math.hypot(norm_a, norm_b)], a[1] + b[1])


def summarise_rows(tensors: list[torch.Tensor]) -> tuple[list[list[float]], int]:
    """The (min, max, sum, L2 norm) of each of many small tensors of one shape, dtype and device, as
    rows of Python floats, and how many numbers each row summarises: four reductions for them all,
    stacked into rows (a decode step shows ~600 small tensors in a dozen shapes; one at a time, the
    overhead of each operation would cost more than the arithmetic)."""
    m = _summed(torch.stack(tensors)).reshape(len(tensors), -1)  # (k, n)
    # (amin and amax: torch.aminmax along a dimension is several times slower on the CPU)
    table = torch.stack([m.amin(dim=1), m.amax(dim=1), m.sum(dim=1), torch.linalg.vector_norm(m, dim=1)],
                        dim=1)  # (k, 4)
    return table.tolist(), m.shape[1]  # (rows as lists: no tensor per row)


def group_key(tensor: torch.Tensor) -> tuple:
    """Tensors with the same key can be stacked into the rows of one batched pass."""
    return tensor.shape, tensor.dtype, tensor.device


def finished(sums: Sums) -> torch.Tensor:
    """(4) float64: min, max, mean and standard deviation, from the sums."""
    (lo, hi, total, norm), n = (sums[0] if isinstance(sums[0], list) else sums[0].tolist()), sums[1]
    mean = total / n
    variance = norm * norm / n - mean * mean  # nan where the values hold infinities (the mask)
    std = variance if variance != variance else math.sqrt(max(variance, 0.0))
    return torch.tensor([lo, hi, mean, std], dtype=torch.float64)

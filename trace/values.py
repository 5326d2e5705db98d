"""Plain-data views of recorded tensors, shared by the tables and the JSON output."""
import math

import torch

from .recorder import TensorRecord

PREVIEW_ROWS, PREVIEW_COLS = 6, 8
HEAD_DIMS = ("H", "Hkv")  # dimensions fixed at one head when a tensor is shown as a matrix


def dim_names(record: TensorRecord) -> list[str]:
    """The symbolic name of each dimension, e.g. ["T", "H", "Dh"] for "(T, H, Dh)", and for one rank's
    "(T, H/N, Dh)" (a tensor-parallel run: the rank's own heads, numbered from 0)."""
    return [n.strip().removesuffix("/N") for n in record.symbolic.strip("()").split(",") if n.strip()]


def as_matrix(record: TensorRecord, head: int, n_rep: int) -> tuple[torch.Tensor, str, str, str]:
    """The recorded values as one 2-D picture: (matrix, row name, column name, what was taken).

    A query-head dimension is fixed at `head`, a KV-head dimension at the KV head
    that serves it; a trailing pair dimension is folded back into the one before.
    1-D values become one row.
    """
    values, names = record.values, dim_names(record)
    taken = []
    if names and names[0] == "B" and values.dim() > 2:  # a training batch: its first row
        values, names = values[0], names[1:]
        taken.append("batch row 0")
    for dim in reversed(range(values.dim())):
        if values.dim() > 2 and names[dim] in HEAD_DIMS:
            index = head if names[dim] == "H" else head // n_rep
            values = values.select(dim, index)
            taken.append(f"{'head' if names.pop(dim) == 'H' else 'KV head'} {index}")
    while values.dim() > 2:  # (…, Dh/2, 2) -> (…, Dh)
        values = values.flatten(-2)
        names[-2:] = ["·".join(names[-2:])]
    if values.dim() < 2:
        values = values.reshape(1, -1)
        names = ["", *names] if names else ["", ""]
    return values, names[0], names[1], f"({', '.join(taken)})" if taken else ""


def preview(record: TensorRecord, max_cols: int | None = None) -> tuple[str, list[list]] | None:
    """A corner of the tensor as (index expression, rows of Python numbers), at most `max_cols` to a row.

    Head dimensions are fixed at head 0 (so that a (T, H, Dh) tensor shows
    tokens by dimensions), then any other dimension beyond the last two at 0.
    Complex values come as (re, im) pairs, fewer to a row.
    """
    values = record.values
    if values is None:
        return None
    if values.dim() == 0:
        return "", [[values.item()]]
    names = dim_names(record)
    index: list = [slice(None)] * values.dim()
    free = list(range(values.dim()))
    for i, name in enumerate(names if len(names) == values.dim() else []):
        if name in HEAD_DIMS and len(free) > 2:
            index[i] = 0
            free.remove(i)
    while len(free) > 2:
        index[free.pop(0)] = 0
    cols = (PREVIEW_COLS // 2 if values.is_complex() else PREVIEW_COLS) * (2 if len(free) == 1 else 1)
    cols = min(cols, max_cols or cols)
    for dim, limit in zip(free, (PREVIEW_ROWS, cols) if len(free) == 2 else (cols,)):
        index[dim] = slice(0, min(limit, values.shape[dim]))
    corner = values[tuple(index)]
    rows = corner.tolist() if corner.dim() == 2 else [corner.tolist()]
    if corner.is_complex():
        rows = [[(z.real, z.imag) for z in row] for row in rows]
    text = ", ".join(str(i) if isinstance(i, int) else f":{i.stop}" for i in index)
    return f"[{text}]", rows


def shape_text(shape: tuple[int, ...]) -> str:
    """(576, 576), (576), (): as the diagrams write shapes."""
    return "(" + ", ".join(map(str, shape)) + ")"


def counted(n: int, noun: str) -> str:
    """'1 step', '4 steps', '2 batches'."""
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def number(v, digits: int | None = None) -> str:
    """Compact text for one value: fixed 4 decimals, or `digits` significant digits."""
    if isinstance(v, (tuple, list)):
        re, im = v
        return f"{number(re, digits)}{'-' if im < 0 else '+'}{number(abs(im), digits)}j"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if digits:
        return f"{v:.{digits}g}"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4f}"


def json_number(v):
    """JSON has no inf or nan: those become strings."""
    if isinstance(v, tuple):
        return [json_number(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


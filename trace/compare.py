"""`diff`: two traces side by side, stage by stage."""
import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .run import Trace
from .values import number


def _shape(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, row by row (never a whole difference tensor at once); -inf minus -inf
    (both masked) is no difference."""
    worst = 0.0
    for row_a, row_b in zip(a if a.dim() > 1 else a[None], b if b.dim() > 1 else b[None], strict=True):
        delta = (row_a.double() - row_b.double()).abs()
        delta = delta[~delta.isnan()]
        worst = max(worst, delta.max().item() if delta.numel() else 0.0)
    return worst


def diff_table(a: Trace, b: Trace, step: int, layer: int, stage: int | None, names: tuple[str, str]) -> Group:
    """Shapes and dtypes of both, and max |a - b| where both kept the values with the same shape."""
    header = Text()
    for label, trace in zip(names, (a, b), strict=True):
        header.append(f"{label}: {trace.model_name} · {trace.device} {trace.dtype} · prompt {trace.prompt!r} "
                      f"({len(trace.prompt_ids)} tokens) → {trace.answer!r}\n")
    same_tokens = a.prompt_ids + a.new_ids == b.prompt_ids + b.new_ids
    header.append("same tokens" if same_tokens else "the tokens differ", style="green" if same_tokens else "yellow")
    table = Table(title=f"step {step}, layer {layer}", title_justify="left")
    for column in ("#", "tensor", "shape A", "shape B", "dtype A/B", "max |A-B|"):
        table.add_column(column, justify="right" if column in ("#", "max |A-B|") else "left")
    records_b = {(r.stage, r.name): r for r in b.select(step, layer)}
    for ra in a.select(step, layer):
        if stage is not None and ra.stage != stage:
            continue
        rb = records_b.get((ra.stage, ra.name))
        if rb is None:
            table.add_row(str(ra.stage), Text(ra.name), _shape(ra.shape), "absent", Text(ra.dtype), "")
            continue
        va, vb = ra.values, rb.values
        if va is None or vb is None:
            difference = Text("values not kept", style="dim")
        elif va.shape != vb.shape:
            difference = Text("shapes differ", style="yellow")
        else:
            worst = _largest_difference(va, vb)
            difference = Text(number(worst, 3), style="green" if worst == 0 else "")
        table.add_row(str(ra.stage), Text(ra.name), _shape(ra.shape), _shape(rb.shape),
                      Text(ra.dtype if ra.dtype == rb.dtype else f"{ra.dtype}/{rb.dtype}"), difference)
    return Group(header, table)

"""`diff`: two traces side by side, stage by stage."""
import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from stages.pipelines import PIPELINES
from stages.rope import reorder

from .recorder import TensorRecord, dtype_name
from .run import Trace
from .tables import names_whole
from .values import counted, number, shape_text

CORNER = "⌜"  # marks a difference of the kept corners only



def _largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, row by row (never a whole difference tensor at once); -inf minus -inf
    (both masked) is no difference."""
    worst = 0.0
    for row_a, row_b in zip(a if a.dim() > 1 else a[None], b if b.dim() > 1 else b[None], strict=True):
        delta = (row_a.to(torch.complex128 if row_a.is_complex() else torch.float64) -
                 row_b.to(torch.complex128 if row_b.is_complex() else torch.float64)).abs()
        delta = delta[~delta.isnan()]
        worst = max(worst, delta.max().item() if delta.numel() else 0.0)
    return worst


def _difference(a: Trace, b: Trace, ra: TensorRecord, rb: TensorRecord) -> Text:
    va, vb = ra.values, rb.values
    if va is None or vb is None:
        return Text("values not kept", style="dim")
    layout_a, layout_b = (PIPELINES[t.pipeline].rope_layout for t in (a, b))
    reordered = layout_a != layout_b and a.stage(ra.stage).spec(ra.name).rope_ordered
    if reordered:  # the same numbers in the other RoPE layout's order: compare like with like
        vb = reorder(vb, b.config.head_dim, to=layout_a)
    if va.shape != vb.shape or ra.shape != rb.shape:  # (weights keep a corner: the same corner of other shapes)
        return Text("shapes differ", style="yellow")
    worst = _largest_difference(va, vb)
    corner = f" {CORNER}" if tuple(va.shape) != tuple(ra.shape) else ""
    return Text(number(worst, 3) + (" ↺" if reordered else "") + corner, style="green" if worst == 0 else "")


def diff_table(a: Trace, b: Trace, step: int, layer: int, stage: int | None, names: tuple[str, str]) -> Group:
    """Shapes and dtypes of both, and max |a - b| where both kept the values with the same shape; the
    tensors that only one of the two implementations has, said as such."""
    header = Text()
    for label, trace in zip(names, (a, b), strict=True):
        how = f"--impl {trace.pipeline}" if trace.ranks == 1 else f"--tp {trace.ranks}, rank {trace.rank}"
        # (values kept rounded: their differences come from that too)
        kept = f" · values kept in {dtype_name(trace.capture.store_dtype)}" if trace.capture.store_dtype else ""
        if trace.training is not None:  # (the text may be long: its size, and what the steps did)
            setup, steps = trace.training.setup, trace.training.steps
            how = (f"train: {counted(len(steps), 'step')} of B={setup.batch} × T={setup.seq} from a {len(trace.prompt_ids)}-token "
                   f"text, lr {setup.lr:g} · loss " + " → ".join(f"{s.loss:.4f}" for s in steps))
            header.append(f"{label}: {trace.model_name} · {trace.device} {trace.dtype}{kept} · {how}\n")
            continue
        header.append(f"{label}: {trace.model_name} · {trace.device} {trace.dtype}{kept} · {how} · "
                      f"prompt {trace.prompt!r} ({len(trace.prompt_ids)} tokens) → {trace.answer!r}\n")
    same_tokens = a.prompt_ids + a.new_ids == b.prompt_ids + b.new_ids
    header.append("same tokens" if same_tokens else "the tokens differ", style="green" if same_tokens else "yellow")
    table = Table(title=f"step {step}, layer {layer}", title_justify="left")
    for column in ("#", "tensor", "shape A", "shape B", "dtype A/B", "max |A-B|"):
        table.add_column(column, justify="right" if column in ("#", "max |A-B|") else "left")
    records_a = {(r.stage, r.name): r for r in a.select(step, layer)}
    records_b = {(r.stage, r.name): r for r in b.select(step, layer)}
    corners = False  # whether a difference is of kept corners
    for key in dict.fromkeys(sorted([*records_a, *records_b], key=lambda k: k[0])):
        if stage is not None and key[0] != stage:
            continue
        ra, rb = records_a.get(key), records_b.get(key)
        if ra is None or rb is None:
            only = ra or rb
            table.add_row(str(key[0]), Text(key[1]), shape_text(ra.shape) if ra else "", shape_text(rb.shape) if rb else "",
                          Text(only.dtype), Text(f"only in {'A' if ra else 'B'}", style="yellow"))
            continue
        difference = _difference(a, b, ra, rb)
        corners = corners or difference.plain.endswith(CORNER)
        table.add_row(str(key[0]), Text(ra.name), shape_text(ra.shape), shape_text(rb.shape),
                      Text(ra.dtype if ra.dtype == rb.dtype else f"{ra.dtype}/{rb.dtype}"), difference)
    names_whole(table, 1)
    captions = []
    if PIPELINES[a.pipeline].rope_layout != PIPELINES[b.pipeline].rope_layout:
        captions.append("↺ B's query and key numbers put in A's RoPE layout (interleaved pairs ↔ rotate-half "
                        "halves) before comparing: the same numbers, in another order")
    if corners:
        captions.append(f"{CORNER} of the kept corner only: weights keep their first rows and columns, and a training "
                        "trace's gradients and updates of weights their first 64 × 64")
    if captions:
        table.caption = Text("\n".join(captions), style="dim")
        table.caption_justify = "left"
    return Group(header, table)

"""Rich renderables: the stage list, the shapes of a step, one stage in detail."""
from rich import box
from rich.cells import cell_len
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stages.pipelines import PIPELINES, PLAIN, Pipeline
from stages.registry import NOTATION
from stages.rope import PAIRS
from stages.tensor_parallel import SPLIT_DIM
from stages.training_stages import GRAD, TRAINING_ROLES, UPDATE, WEIGHT_GRAD

from .recorder import STAT_NAMES, TensorRecord, dtype_name
from .run import Trace
from .heatmap import terminal_heatmap
from .values import as_matrix, number, preview, shape_text

ROLE_STYLE = {"in": "cyan", "weight": "magenta", "aux": "yellow", "mid": "default", "out": "green",
              GRAD: "red", WEIGHT_GRAD: "red", UPDATE: "blue"}
ROLE_LEGEND = Text.assemble("tensors: ", ("in", "cyan"), " · ", ("weight", "magenta"), " · ",
                            ("aux (made for this step)", "yellow"), " · intermediate · ", ("out", "green"))
BACKWARD = frozenset({GRAD, WEIGHT_GRAD})  # what the backward pass adds to a training step's records
SHOWN_PIECES = 200  # of the tokens a stage-1 table lists (a training text has thousands)


def stages_table(pipeline: Pipeline = PLAIN) -> Group:
    title = "The 19 stages of a LLaMA forward pass" + ("" if pipeline is PLAIN else f", {pipeline.title}")
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("stage (as the diagrams name it)")
    table.add_column("runs once per")
    for s in pipeline.stages:
        table.add_row(str(s.number), s.title, s.scope)
    legend = Text("Shapes: " + ", ".join(f"{k} = {v}" for k, v in NOTATION), style="dim")
    return Group(table, legend)


def packing_table(parts: list) -> Table:
    """Which checkpoint tensors each packed weight is made of (stages.packed.PackedPart), in order."""
    table = _table("How the packed weights are made: checkpoint tensors stacked row-wise, in this order",
                   "packed", "rows", "part", "Meta / Hugging Face / GGUF name")
    for column in table.columns:
        column.no_wrap = True
    for p in parts:
        rows = f"{p.rows.start}-{p.rows.stop - 1}" if p.rows is not None else p.shape
        mark = "*" if p.row_order == "rotate-half" else ""
        table.add_row(Text(p.packed, style="magenta"), rows, Text(p.name + mark, style="magenta"),
                      "\n".join(p.checkpoint_names))
    table.caption = Text("* rows in rotate-half order: each head's (x[i], x[i+Dh/2]) pairs, as Hugging Face "
                         "stores them; Meta's and GGUF's interleaved rows are reordered so", style="dim")
    table.caption_justify = "left"
    return table


VOCABULARY_ROWS = ("tok_embeddings", "output")


def split_table(trace: Trace, records: list[TensorRecord]) -> Table | None:
    """Of a tensor-parallel trace: which slice of each of these weights every rank holds."""
    weights = [r for r in records if r.role == "weight" and r.name in SPLIT_DIM]
    if not weights:
        return None
    table = _table(f"The weights split over {trace.ranks} ranks (rank {trace.rank} shown above)", "weight",
                   "whole", "each rank holds", *(f"rank {rank}" for rank in range(trace.ranks)))
    for r in weights:
        dim = SPLIT_DIM[r.name]
        whole = list(r.shape)
        whole[dim] *= trace.ranks
        part = r.shape[dim]
        slices = [Text(f"{rank * part}-{(rank + 1) * part - 1}", style="bold" if rank == trace.rank else "dim")
                  for rank in range(trace.ranks)]
        held = "rows (tokens)" if r.name in VOCABULARY_ROWS else "rows (outputs)" if dim == 0 else "columns (inputs)"
        table.add_row(Text(r.name, style=ROLE_STYLE["weight"]), shape_text(tuple(whole)), held, *slices)
    table.caption = Text("column-parallel weights split their output rows, row-parallel ones their input columns "
                         "(the product is then a partial sum, all-reduced); the embedding and the output head "
                         "split the vocabulary", style="dim")
    table.caption_justify = "left"
    return table


def model_line(trace: Trace) -> str:
    c = trace.config
    return (f"{trace.model_name} · L={c.n_layers} D={c.dim} H={c.n_heads} Hkv={c.n_kv_heads} Dh={c.head_dim} "
            f"F={c.ffn_dim} V={c.vocab_size} · {trace.device} {trace.dtype}")



def _table(title: str | None, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for name in columns:
        table.add_column(name, justify="right" if name in STAT_NAMES or name == "#" else "left")
    return table


def names_whole(table: Table, column: int) -> Table:
    """In a narrow terminal, a name too long for its column goes on in the next line: names that
    differ only at their ends (wq.exp_avg, wq.exp_avg_sq) are never cut."""
    table.columns[column].overflow = "fold"
    return table


class _StageHeader:
    """A stage's explanation in a panel, with its title and where in the run on the frame, or, where
    the terminal is too narrow for them, as lines inside it (a frame would cut them, numbers too)."""

    def __init__(self, text: Text, title: str, where: str):
        self.text, self.title, self.where = text, title, where

    def __rich_console__(self, console, options):
        if max(cell_len(self.title), cell_len(self.where)) + 6 <= options.max_width:
            yield Panel(self.text, title=self.title, title_align="left", subtitle=self.where, subtitle_align="left")
        else:
            yield Panel(Group(Text(self.title, style="bold"), self.text, Text(self.where, style="dim")))


def shapes_table(trace: Trace, step: int, layer: int) -> Table:
    """Every stage's tensors for one step and layer: dtype, symbolic and concrete shape."""
    training = trace.training is not None
    columns = ("#", "tensor", "dtype", "symbolic", "shape") + (("‖∂loss/∂‖",) if training else ())
    table = _table(f"Shapes at {trace.describe(step, layer)}", *columns)
    records = trace.select(step, layer)
    # Of a training step: each tensor's gradient norm beside it, rather than the gradients as rows of their own.
    grad_norms = {(r.stage, r.name.removesuffix(".grad")): r.norm for r in records if r.role in BACKWARD}
    for s in trace.stages:
        table.add_row(str(s.number), Text(s.short, style="bold"))
        for r in (r for r in records if r.stage == s.number and r.role not in TRAINING_ROLES):
            norm = grad_norms.get((r.stage, r.name))
            table.add_row("", Text(r.name, style=ROLE_STYLE[r.role]), Text(r.dtype), Text(r.symbolic),
                          shape_text(r.shape), *((Text(number(norm, digits=4) if norm is not None else "", style="red"),) if training else ()))
    table.caption = ROLE_LEGEND
    table.caption_justify = "left"
    return table


def _stats_table(title: str | None, records: list[TensorRecord], norm: bool = False) -> Table:
    stats = _table(title, "tensor", *(("norm",) if norm else ()), *STAT_NAMES)
    for r in records:
        shown = [number(r.norm, digits=4) if r.norm is not None else ""] if norm else []
        stats.add_row(Text(r.name, style=ROLE_STYLE[r.role]), *shown,
                      *(number(v, digits=4) for v in (r.stats or {}).values()))
    return names_whole(stats, 0)


class _Preview:
    """A corner of a record's values, with as many columns as the terminal has room for (a number is
    never cut: a narrow terminal shows fewer of them, and the index above says which)."""

    def __init__(self, record: TensorRecord):
        self.record = record

    def __rich_console__(self, console, options):
        index, rows = preview(self.record)
        widths = [max(len(number(row[j])) for row in rows) + 2 for j in range(len(rows[0]))]  # (padding 1 a side)
        fits = max(1, sum(1 for end in range(1, len(widths) + 1) if sum(widths[:end]) <= options.max_width))
        if fits < len(widths):
            index, rows = preview(self.record, fits)
        table = Table(show_header=False, box=None, padding=(0, 1))
        for _ in rows[0]:
            table.add_column(justify="right", no_wrap=True)
        for row in rows:
            table.add_row(*(number(v) for v in row))
        kept = dtype_name(self.record._values.dtype)
        rounded = f", kept in {kept}" if kept != self.record.dtype else ""  # (--store-dtype)
        yield Text.assemble((self.record.name, ROLE_STYLE[self.record.role]),
                            f"{index} of {shape_text(self.record.shape)}{rounded}")
        yield table


def _heatmap(trace: Trace, s, records: list[TensorRecord], head: int):
    main = next((r for r in records if r.name == s.main and r.values is not None), None)
    if main is None or main.values.numel() < 2:
        return None
    matrix, rows, cols, what = as_matrix(main, head, trace.config.n_rep)
    if matrix.is_complex():
        matrix = matrix.abs()
    return terminal_heatmap(matrix, f"Heatmap of {main.name} {what} (rows {rows or '-'}, columns {cols})")


def stage_detail(trace: Trace, number_: int, step: int, layer: int, head: int = 0) -> Group:
    """One stage: what it does, its tensors with shapes and statistics, a corner of each."""
    s = trace.stage(number_)
    records = trace.select(step, layer, stage=number_)
    header = _StageHeader(Text(s.explanation), f"Stage {s.number} · {s.title}",
                          trace.describe(step, layer if s.scope == "layer" else None) if s.scope != "run"
                          else "once per run")
    forward = [r for r in records if r.role not in TRAINING_ROLES]
    shapes = _table(None, "tensor", "role", "dtype", "symbolic", "shape")
    for r in forward:
        shapes.add_row(Text(r.name, style=ROLE_STYLE[r.role]), Text(r.role), Text(r.dtype), Text(r.symbolic),
                       shape_text(r.shape))
    names_whole(shapes, 0)
    parts = [header, shapes] if trace.shapes_only else [header, shapes, _stats_table(None, forward)]
    if trace.training is not None:
        backward, updates = [r for r in records if r.role in BACKWARD], [r for r in records if r.role == UPDATE]
        if backward:
            parts.append(_stats_table("Backward pass: the gradient of the loss with respect to each tensor",
                                      backward, norm=True))
        if updates:
            parts.append(_stats_table("AdamW: each weight's update (new - old) and the moments it keeps (m, v)",
                                      updates, norm=True))
        records = [r for r in records if r.role != UPDATE]  # their pictures: --plot
    if (heatmap := _heatmap(trace, s, records, head)) is not None:
        parts.append(heatmap)
    previews = [_Preview(r) for r in records if r._values is not None]  # (.values would copy them)
    if previews:
        parts += [Text("Values (a corner of each tensor):", style="bold"), *previews]
    elif records and trace.shapes_only:
        parts.append(Text("Shapes only: the meta device computes no values.", style="dim"))
    elif records:
        parts.append(Text("Values were not kept for this step and layer, only statistics.", style="dim"))
    if s.number == 10 and trace.source:
        pairs = PAIRS[PIPELINES[trace.pipeline].rope_layout]
        parts.append(Text(f"The weights: {trace.source}. The rotation shown is the one the stages apply, to "
                          f"{pairs}.", style="dim"))
    packer = PIPELINES[trace.pipeline].packed_parts
    if packer is not None:
        packed = [p for p in packer(trace.config) if p.packed in {r.name for r in records}]
        if packed:
            parts.append(packing_table(packed))
    if trace.ranks > 1 and (split := split_table(trace, records)) is not None:
        parts.append(split)
    if s.number == 1:
        ids = trace.prompt_ids
        more = f" … and {len(ids) - SHOWN_PIECES} more ({len(ids)} in all)" if len(ids) > SHOWN_PIECES else ""
        parts.append(Text("Pieces: " + " ".join(repr(trace.piece(i)) for i in ids[:SHOWN_PIECES]) + more))
    return Group(*parts)

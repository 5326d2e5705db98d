"""Graphviz drawings of the stages, in the spirit of the "LLaMA Nuts and Bolts"
originals: the flow goes up, frames nest model > block > module, green boxes
are tensors (name, dtype, symbolic and concrete shape), blue boxes operations,
and a pink band says "You are here".

Everything drawn comes from the stage registry; dtypes and concrete shapes
come from a trace when there is one.
"""
from dataclasses import dataclass, replace
from html import escape

import graphviz

from stages import UserError
from stages.pipelines import N_STAGES, PIPELINES, PLAIN, Pipeline
from stages.registry import Stage, TensorSpec
from stages.tensor_parallel import ALL_GATHER, ALL_REDUCE
from stages.training_stages import TRAINING_ROLES

from .recorder import TensorRecord
from .run import Trace
from .values import shape_text

FONT = "Helvetica"
TENSOR_FILL = {"in": "#1b7a3a", "mid": "#1b7a3a", "out": "#1b7a3a", "weight": "#6a3d9a", "aux": "#00737a"}
OP_FILL = "#1e88e5"
ELSEWHERE_FILL = "#d8b4bc"  # the "..." boxes for the stages before and after
HERE_FILL = "#fff7f8"
# Grey, darker than the "You are here" band, so that the eye finds the stage first (as in the originals).
FRAME_FILL = ("#b0bec5", "#c5ced3", "#d5dcd5")
DIMMED = {"fillcolor": "#eceff1", "fontcolor": "#90a4ae", "color": "#cfd8dc"}  # the rest of the model
FLOW = {"color": "#455a64"}
RESIDUAL = {"color": "#d32f2f", "penwidth": "2.2"}  # the skip arrows of the residual stream, red as in the originals
FRAME_LABEL_ON_TOP = {"labelloc": "t", "labeljust": "l"}
COLLECTIVES = (ALL_REDUCE, ALL_GATHER)
COLLECTIVE_FILL = "#e65100"
COLLECTIVE_EDGE = {"color": COLLECTIVE_FILL, "penwidth": "1.6"}
LANE_FILL = "#eef3f8"  # the ranks' lanes
SHARED = ""  # the node-id prefix of what is drawn once for every rank
MODULES = {range(8, 15): "Multi-Head Self-Attention Module", range(17, 18): "Feed-Forward Module"}


@dataclass(frozen=True)
class Context:
    """Where the drawing is: the model's name and the layer drawn; `records` from a trace, or None."""
    model_name: str
    layer: int
    records: list[TensorRecord] | None = None
    where: str = ""  # e.g. "step 0 (prompt: P=0, T=37)"
    here: int | None = None  # the stage the complete-model drawing lights up
    pipeline: Pipeline = PLAIN  # whose stages are drawn
    ranks: int = 1  # of a tensor-parallel run: the records are every rank's, drawn in one lane per rank
    rank: int = 0  # the rank whose records `record` finds
    lanes: tuple[str, ...] = ()  # the node-id prefixes of the ranks' lanes in the stage drawn


    def record(self, stage: int, name: str) -> TensorRecord | None:
        return next((r for r in self.records or () if r.stage == stage and r.name == name and r.rank == self.rank),
                    None)



def _white(text: str, bold: bool = False) -> str:
    """Text for an HTML-like label cell (graphviz rejects an empty <font> element)."""
    if not text:
        return " "
    text = f"<b>{escape(text)}</b>" if bold else escape(text)
    return f'<font color="white">{text}</font>'


def tensor_label(spec: TensorSpec, record: TensorRecord | None, fill: str) -> str:
    dtype = record.dtype if record else ""
    concrete = shape_text(record.shape) if record else ""
    return (f'<<table border="0" cellborder="0" cellspacing="0" cellpadding="3" bgcolor="{fill}">'
            f'<tr><td align="left">{_white("Tensor: " + spec.name, bold=True)}</td>'
            f'<td align="right">{_white(dtype)}</td></tr>'
            f'<tr><td align="left">{_white(spec.shape)}</td>'
            f'<td align="right">{_white(concrete)}</td></tr></table>>')


def _up(g: graphviz.Digraph, tail: str, head: str, **attrs) -> None:
    """An arrow from `tail` up to `head`."""
    g.edge(head, tail, dir="back", **attrs)


def _new_graph(title: str, subtitle: str) -> graphviz.Digraph:
    # The flow goes up, but graphviz is asked for a top-down layout with every edge drawn backwards
    # (see _up): only that way does it keep side-by-side tensors in order (xq | xk | xv).
    g = graphviz.Digraph(graph_attr={"rankdir": "TB", "ordering": "in", "fontname": FONT, "labelloc": "t", "labeljust": "l",
                                     "label": f"{title}\n{subtitle}", "fontsize": "18", "nodesep": "0.35",
                                     "ranksep": "0.35", "bgcolor": "white"},
                         node_attr={"fontname": FONT, "fontsize": "11", "shape": "box", "style": "rounded,filled",
                                    "penwidth": "0", "margin": "0.1,0.04"},
                         edge_attr={"fontname": FONT, "fontsize": "10", "color": "#455a64", "arrowsize": "0.7"})
    return g


def _training(pipeline: Pipeline) -> bool:
    return pipeline.forward_step is None  # (a training step: no generation loop)


def _engine(pipeline: Pipeline) -> str:
    return "Training: stages 1-2 once, 3-19 at every step" if _training(pipeline) else "Inference engine"


def _frames(stage: Stage, ctx: Context) -> list[str]:
    if stage.scope == "run":
        return ["Training: before the steps" if _training(ctx.pipeline) else "Inference engine: before the generation loop"]
    frames = [f"Transformer Model: {ctx.model_name}"]
    if stage.scope == "layer":
        frames.append(f"Transformer Block (Layer {ctx.layer})")
        frames += [name for numbers, name in MODULES.items() if stage.number in numbers]
    return frames


def _node_id(name: str) -> str:
    return "t_" + "".join(c if c.isalnum() else "_" for c in name)


def _present(stage: Stage, ctx: Context) -> list[TensorSpec]:
    """The stage's tensors that the drawing shows: all of them, or those the run recorded; the forward
    pass only (a training step's gradients and updates are numbers beside the tensors, in the tables)."""
    return [t for t in stage.tensors if t.role not in TRAINING_ROLES
            and (ctx.records is None or ctx.record(stage.number, t.name))]


def _keep_in_order(g: graphviz.Digraph, anchor: str, nodes: list[str], below: bool) -> None:
    """Side by side in this order: an invisible node below (or above) them all, whose arrows
    graphviz keeps in the order they are made."""
    g.node(anchor, "", style="invis", width="0", height="0", ordering="in" if below else "out")
    for node in nodes:
        if below:
            _up(g, anchor, node, style="invis")
        else:
            _up(g, node, anchor, style="invis")


def _draw_stage_body(g: graphviz.Digraph, stage: Stage, ctx: Context, present: list[TensorSpec],
                     lane: str = "", shared: frozenset[str] = frozenset()) -> None:
    """The stage's tensors and operations, node ids prefixed with `lane` (one rank's). In a lane, the
    tensors `shared` by all ranks (a collective's result, and what is made from it alone) are left out,
    and so are the operations that make them: _draw_shared draws those once."""
    names = {t.name for t in present}
    for spec in present:
        if shared and (spec.name in shared) != (lane == SHARED):
            continue
        g.node(lane + _node_id(spec.name), tensor_label(spec, ctx.record(stage.number, spec.name),
                                                        TENSOR_FILL[spec.role]), shape="plain", style="")
    if not (shared and lane == SHARED):
        _keep_in_order(g, lane + "inputs", [lane + _node_id(t.name) for t in present if t.role == "in"], below=True)
    for i, op in enumerate(stage.ops):
        if shared and (set(op.outputs) <= shared) != (lane == SHARED):
            continue
        collective = op.label in COLLECTIVES
        g.node(f"{lane}op{i}", f"{op.label}\n(torch.distributed, every rank)" if collective else op.label,
               fillcolor=COLLECTIVE_FILL if collective else OP_FILL, fontcolor="white", style="rounded,filled")
        for name in op.inputs:
            if name in names:
                for source in (ctx.lanes if collective else [lane if name not in shared else SHARED]):
                    _up(g, source + _node_id(name), f"{lane}op{i}", **(COLLECTIVE_EDGE if collective else {}))
        for name in op.outputs:
            if name in names:
                _up(g, f"{lane}op{i}", lane + _node_id(name))


def _split(stage: Stage, ctx: Context) -> tuple[list[str], frozenset[str]]:
    """Of a tensor-parallel trace, where the ranks differ in this stage (their own slices, or a
    collective): the lanes (node-id prefixes, one per rank) and the tensors every rank holds alike after
    the collective. Else one lane for all (every rank computes the same)."""
    if ctx.ranks == 1 or not (any("/N" in t.shape for t in stage.tensors) or
                              any(o.label in COLLECTIVES for o in stage.ops)):
        return [SHARED], frozenset()
    shared: set[str] = set()
    for o in stage.ops:
        if o.label in COLLECTIVES or (o.inputs and set(o.inputs) <= shared):
            shared.update(o.outputs)
    return [f"r{rank}_" for rank in range(ctx.ranks)], frozenset(shared)


def _source_label(source: Stage, number: int) -> str:
    later = " of the block before" if source.number > number else ""  # the loop over blocks comes back
    return f"... stage {source.number}: {source.short}{later}"


def _draw_data_flow(g: graphviz.Digraph, stage: Stage, present: list[TensorSpec], pipeline: Pipeline,
                    lanes: list[str], shared: frozenset[str]) -> None:
    """Each input from the stage that makes it, each tensor to the stages that read it (in every lane):
    the residual stream's skips in red."""
    boxes = set()
    sources = [source for spec in present for source in spec.sources]
    _keep_in_order(g, "sources", [f"from{n}" for n in dict.fromkeys(sources)], below=True)
    targets = [reader.number for spec in present for reader, _ in pipeline.readers(stage.number, spec.name)]
    _keep_in_order(g, "readers", [f"to{n}" for n in dict.fromkeys(targets)], below=False)
    for spec in present:
        for source in spec.sources:
            if source not in boxes:
                boxes.add(source)
                g.node(f"from{source}", _source_label(pipeline.stage(source), stage.number), fillcolor=ELSEWHERE_FILL)
            # Two ranks down: below the invisible node that orders the inputs, outside "You are here".
            for lane in lanes:
                _up(g, f"from{source}", lane + _node_id(spec.name), minlen="2",
                    **(RESIDUAL if spec.residual else FLOW))
        for reader, reader_spec in pipeline.readers(stage.number, spec.name):
            if -reader.number not in boxes:
                boxes.add(-reader.number)
                g.node(f"to{reader.number}", f"stage {reader.number}: {reader.short} ...", fillcolor=ELSEWHERE_FILL)
            for lane in [SHARED] if spec.name in shared else lanes:
                _up(g, lane + _node_id(spec.name), f"to{reader.number}",
                    **(RESIDUAL if reader_spec.residual else FLOW))


def _legend(g: graphviz.Digraph, collectives: bool = False) -> None:
    """What the colours mean, as one small box beside the drawing."""
    keys = [("tensor", TENSOR_FILL["out"]), ("weight", TENSOR_FILL["weight"]),
            ("made for this step", TENSOR_FILL["aux"]), ("operation", OP_FILL)]
    keys += [("collective (between ranks)", COLLECTIVE_FILL)] if collectives else []
    rows = "".join(f'<tr><td bgcolor="{fill}">{_white(text)}</td></tr>' for text, fill in keys)
    rows += f'<tr><td bgcolor="{ELSEWHERE_FILL}">another stage</td></tr>'
    rows += f'<tr><td><font color="{RESIDUAL["color"]}"><b>⟶ residual stream (skip)</b></font></td></tr>'
    g.node("legend", f'<<table border="1" color="#b0bec5" cellborder="0" cellspacing="2" cellpadding="3" '
                     f'bgcolor="white"><tr><td><b>Legend</b></td></tr>{rows}</table>>',
           shape="plain", style="", fontsize="9")


def stage_diagram(number: int, ctx: Context) -> graphviz.Digraph:
    """One stage, inside its frames, with "..." boxes for the stages its tensors come from and go to."""
    stage = ctx.pipeline.stage(number)
    g = _new_graph(f"Stage {stage.number}: {stage.title}", ctx.where or "symbolic shapes (no run)")
    frames = _frames(stage, ctx)
    present = _present(stage, ctx)
    lanes, shared = _split(stage, ctx)
    same = f" · the same on each of the {ctx.ranks} ranks" if ctx.ranks > 1 and lanes == [SHARED] else ""
    ctx = replace(ctx, lanes=tuple(lanes))

    def nest(parent: graphviz.Digraph, depth: int):
        if depth == len(frames):
            _draw_data_flow(parent, stage, present, ctx.pipeline, lanes, shared)
            with parent.subgraph(name="cluster_here") as here:
                here.attr(label="You are here" + same, style="filled,dashed", fillcolor=HERE_FILL, color="#37474f",
                          fontcolor="#c62828", fontsize="14", penwidth="2", **FRAME_LABEL_ON_TOP)
                if lanes == [SHARED]:
                    _draw_stage_body(here, stage, ctx, present)
                    return
                for rank, lane in enumerate(lanes):
                    with here.subgraph(name=f"cluster_{lane}") as box:
                        shown = rank == ctx.rank  # the rank the tables show (--rank) is framed
                        box.attr(label=f"rank {rank}" + (" (shown in the tables)" if shown else ""), style="filled",
                                 fillcolor=LANE_FILL, color="#c62828" if shown else "#90a4ae",
                                 penwidth="2" if shown else "1", fontsize="13", **FRAME_LABEL_ON_TOP)
                        _draw_stage_body(box, stage, replace(ctx, rank=rank), present, lane, shared)
                if shared:  # the same on every rank: drawn once
                    _draw_stage_body(here, stage, ctx, present, SHARED, shared)
            return
        with parent.subgraph(name=f"cluster_frame{depth}") as frame:
            frame.attr(label=frames[depth], style="filled", fillcolor=FRAME_FILL[depth % len(FRAME_FILL)],
                       color="#78909c", fontsize="14", **FRAME_LABEL_ON_TOP)
            nest(frame, depth + 1)

    nest(g, 0)
    _legend(g, collectives=ctx.ranks > 1)
    return g


def _stage_box(stage: Stage, ctx: Context, dimmed: bool) -> str:
    title_fill, tensor_fill = ("#cfd8dc", "#e0e6e9") if dimmed else (OP_FILL, TENSOR_FILL["out"])
    text = (lambda t, bold=False: f'<font color="#90a4ae">{escape(t) or " "}</font>') if dimmed else _white
    rows = [f'<tr><td colspan="2" bgcolor="{title_fill}">{text(f"{stage.number}. {stage.title}", bold=True)}</td></tr>']
    for spec in stage.tensors:
        record = ctx.record(stage.number, spec.name)
        if spec.role != "out" or (ctx.records is not None and record is None):
            continue
        concrete = f"{record.dtype} {shape_text(record.shape)}" if record else ""
        rows.append(f'<tr><td align="left" bgcolor="{tensor_fill}">{text(f"{spec.name} {spec.shape}")}</td>'
                    f'<td align="right" bgcolor="{tensor_fill}">{text(concrete)}</td></tr>')
    border = ' border="3" color="#c62828"' if not dimmed and ctx.here else ' border="0"'
    return f'<<table{border} cellborder="0" cellspacing="1" cellpadding="3">{"".join(rows)}</table>>'


def _model_edges(g: graphviz.Digraph, pipeline: Pipeline) -> None:
    """Every tensor from the stage that makes it to the stages that read it (the registry's data
    flow): the residual stream's skips in red, the loops dashed."""
    for stage in pipeline.stages:
        flows = {}
        for spec in stage.tensors:
            for reader, reader_spec in pipeline.readers(stage.number, spec.name):
                flows[reader.number] = flows.get(reader.number, False) or reader_spec.residual
        for number, residual in flows.items():
            attrs = dict(RESIDUAL if residual else FLOW)
            if number < stage.number:  # back to the top of the block loop: the stream into the next block
                attrs.update(style="dashed", label="next block", constraint="false", **RESIDUAL)
            _up(g, f"s{stage.number}", f"s{number}", **attrs)
    if not _training(pipeline):
        _up(g, "s19", "s3", label="next token", style="dashed", constraint="false")


def model_diagram(ctx: Context) -> graphviz.Digraph:
    """The complete model: the 19 stages in their frames, the data flowing between them, the two
    loops; with `ctx.here`, the rest of the model dimmed around that stage."""
    g = _new_graph("The complete model: 19 stages", ctx.where or "symbolic shapes (no run)")
    g.attr("node", shape="plain", style="")

    def boxes(frame: graphviz.Digraph, numbers) -> None:
        for n in numbers:
            frame.node(f"s{n}", _stage_box(ctx.pipeline.stage(n), ctx, dimmed=ctx.here not in (None, n)))

    with g.subgraph(name="cluster_engine") as engine:
        engine.attr(label=_engine(ctx.pipeline), style="filled", fillcolor=FRAME_FILL[0], color="#78909c",
                    fontsize="14", **FRAME_LABEL_ON_TOP)
        boxes(engine, (1, 2, 3))
        with engine.subgraph(name="cluster_model") as model:
            model.attr(label=f"Transformer Model: {ctx.model_name}", fillcolor=FRAME_FILL[1])
            boxes(model, (4, 19))
            with model.subgraph(name="cluster_block") as block:
                block.attr(label=f"Transformer Block (Layer {ctx.layer}; L blocks in all)", fillcolor=FRAME_FILL[2])
                boxes(block, (5, 6, 15, 16, 18))
                with block.subgraph(name="cluster_attention") as attention:
                    attention.attr(label=MODULES[range(8, 15)], fillcolor=FRAME_FILL[0])
                    boxes(attention, range(7, 15))
                with block.subgraph(name="cluster_ffn") as ffn:
                    ffn.attr(label=MODULES[range(17, 18)], fillcolor=FRAME_FILL[0])
                    boxes(ffn, (17,))
    _model_edges(g, ctx.pipeline)
    _legend(g)
    return g


def packing_diagram(pipeline: Pipeline, trace: Trace | None) -> graphviz.Digraph:
    """The checkpoint's tensors of one layer flowing into the packed weights they are stacked into."""
    where = f"{trace.model_name}: concrete rows" if trace else "symbolic shapes (no run)"
    g = _new_graph(f"How --impl {pipeline.name} makes its weights: {pipeline.title}", where)
    parts = pipeline.packed_parts(trace.config if trace else None)
    for packed in dict.fromkeys(p.packed for p in parts):
        members = [p for p in parts if p.packed == packed]
        shape = next(t.shape for s in pipeline.stages for t in s.tensors if t.name == packed)
        total = f"{members[-1].rows.stop} rows" if trace else ""
        g.node(_node_id(packed), f"<<table border=\"0\" cellborder=\"0\" cellpadding=\"3\" bgcolor=\"{TENSOR_FILL['weight']}\">"
               f"<tr><td>{_white('Packed weight: ' + packed, bold=True)}</td></tr>"
               f"<tr><td>{_white(shape + ('  ' + total if total else ''))}</td></tr></table>>", shape="plain", style="")
        op_id = f"cat_{packed}"
        g.node(op_id, "concatenate rows, in this order", fillcolor=OP_FILL, fontcolor="white", style="rounded,filled")
        _up(g, op_id, _node_id(packed))
        for p in members:
            rows = f"rows {p.rows.start}-{p.rows.stop - 1}" if p.rows is not None else ""
            lines = [f"<tr><td>{_white(p.name + ' ' + p.shape, bold=True)}</td></tr>"]
            lines += [f"<tr><td>{_white(name)}</td></tr>" for name in p.checkpoint_names]
            lines.append(f"<tr><td>{_white(p.row_order + ('; ' + rows if rows else ''))}</td></tr>")
            g.node(_node_id(packed + p.name), f"<<table border=\"0\" cellborder=\"0\" cellpadding=\"2\" "
                   f"bgcolor=\"{TENSOR_FILL['out']}\">{''.join(lines)}</table>>", shape="plain", style="")
            _up(g, _node_id(packed + p.name), op_id)
    return g


def drawing(number: int | None, trace: Trace | None, step: int = 0, layer: int = 0,
            here: int | None = None, pipeline: Pipeline = PLAIN) -> graphviz.Digraph:
    """Stage `number`, or the complete model when None (with stage `here` lit and the rest dimmed,
    when given); with a trace's dtypes and shapes when given, else the stages of `pipeline`."""
    if here is not None and not 1 <= here <= N_STAGES:
        raise UserError(f"there is no stage {here}: stages are numbered 1-{N_STAGES}")
    if trace is None:
        ctx = Context("any LLaMA model", layer, here=here, pipeline=pipeline)
    else:
        where = trace.describe(step, layer) + ("" if trace.pipeline == PLAIN.name or trace.training
                                               else f" · --impl {trace.pipeline}")
        if trace.ranks > 1:
            where = trace.describe(step, layer) + f" · tensor parallel over {trace.ranks} ranks" + \
                ("" if number is not None else f" (rank {trace.rank or 0}'s shapes)")
        ctx = Context(trace.model_name, layer, trace.select(step, layer), where, here, PIPELINES[trace.pipeline],
                      trace.ranks, trace.rank or 0)
    return model_diagram(ctx) if number is None else stage_diagram(number, ctx)


FORMATS = ("svg", "png", "pdf", "dot")


def render(graph: graphviz.Digraph, fmt: str) -> bytes:
    """The drawing as `fmt` ("svg", "png" or "dot"), drawn by the real `dot` program."""
    if fmt == "dot":
        return graph.source.encode()
    try:
        return graph.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise UserError("graphviz's 'dot' program is not installed (Debian/Ubuntu: apt-get install graphviz)") \
            from None

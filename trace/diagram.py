"""Graphviz drawings of the stages, in the spirit of the "LLaMA Nuts and Bolts"
originals: the flow goes up, frames nest model > block > module, green boxes
are tensors (name, dtype, symbolic and concrete shape), blue boxes operations,
and a pink band says "You are here".

Everything drawn comes from the stage registry; dtypes and concrete shapes
come from a trace when there is one.
"""
from dataclasses import dataclass
from html import escape

import graphviz

from stages import UserError
from stages.registry import STAGES, Stage, TensorSpec, stage as stage_info

from .recorder import TensorRecord
from .run import Trace

FONT = "Helvetica"
TENSOR_FILL = {"in": "#1b7a3a", "mid": "#1b7a3a", "out": "#1b7a3a", "weight": "#6a3d9a", "aux": "#00737a"}
OP_FILL = "#1e88e5"
ELSEWHERE_FILL = "#d8b4bc"  # the "..." boxes for the stages before and after
HERE_FILL = "#fde8ea"
FRAME_FILL = ("#eceff1", "#cfd8dc", "#dfe8df")
# With the flow going up (rankdir=BT) graphviz flips cluster labels: "b" puts them on top.
FRAME_LABEL_ON_TOP = {"labelloc": "b", "labeljust": "l"}
MODULES = {range(8, 15): "Multi-Head Self-Attention Module", range(17, 18): "Feed-Forward Module"}


@dataclass(frozen=True)
class Context:
    """Where the drawing is: the model's name and the layer drawn; `records` from a trace, or None."""
    model_name: str
    layer: int
    records: list[TensorRecord] | None = None
    where: str = ""  # e.g. "step 0 (prompt: P=0, T=37)"

    def record(self, stage: int, name: str) -> TensorRecord | None:
        return next((r for r in self.records or () if r.stage == stage and r.name == name), None)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _white(text: str, bold: bool = False) -> str:
    """Text for an HTML-like label cell (graphviz rejects an empty <font> element)."""
    if not text:
        return " "
    text = f"<b>{escape(text)}</b>" if bold else escape(text)
    return f'<font color="white">{text}</font>'


def tensor_label(spec: TensorSpec, record: TensorRecord | None, fill: str) -> str:
    dtype = record.dtype if record else ""
    concrete = _shape(record.shape) if record else ""
    return (f'<<table border="0" cellborder="0" cellspacing="0" cellpadding="3" bgcolor="{fill}">'
            f'<tr><td align="left">{_white("Tensor: " + spec.name, bold=True)}</td>'
            f'<td align="right">{_white(dtype)}</td></tr>'
            f'<tr><td align="left">{_white(spec.shape)}</td>'
            f'<td align="right">{_white(concrete)}</td></tr></table>>')


def _new_graph(title: str, subtitle: str) -> graphviz.Digraph:
    g = graphviz.Digraph(graph_attr={"rankdir": "BT", "fontname": FONT, "labelloc": "t", "labeljust": "l",
                                     "label": f"{title}\n{subtitle}", "fontsize": "18", "nodesep": "0.35",
                                     "ranksep": "0.35", "bgcolor": "white"},
                         node_attr={"fontname": FONT, "fontsize": "11", "shape": "box", "style": "rounded,filled",
                                    "penwidth": "0", "margin": "0.1,0.04"},
                         edge_attr={"fontname": FONT, "fontsize": "10", "color": "#455a64", "arrowsize": "0.7"})
    return g


def _frames(stage: Stage, ctx: Context) -> list[str]:
    if stage.scope == "run":
        return ["Inference engine: before the generation loop"]
    frames = [f"Transformer Model: {ctx.model_name}"]
    if stage.scope == "layer":
        frames.append(f"Transformer Block (Layer {ctx.layer})")
        frames += [name for numbers, name in MODULES.items() if stage.number in numbers]
    return frames


def _node_id(name: str) -> str:
    return "t_" + "".join(c if c.isalnum() else "_" for c in name)


def _draw_stage_body(g: graphviz.Digraph, stage: Stage, ctx: Context) -> tuple[list[str], list[str]]:
    """Tensors and operations of one stage; returns the ids that the stages before and after connect to."""
    present = {t.name for t in stage.tensors if ctx.records is None or ctx.record(stage.number, t.name)}
    for spec in stage.tensors:
        if spec.name in present:
            g.node(_node_id(spec.name), tensor_label(spec, ctx.record(stage.number, spec.name),
                                                     TENSOR_FILL[spec.role]), shape="plain", style="")
    produced = set()
    for i, op in enumerate(stage.ops):
        op_id = f"op{i}"
        g.node(op_id, op.label, fillcolor=OP_FILL, fontcolor="white", style="rounded,filled")
        for name in op.inputs:
            if name in present:
                g.edge(_node_id(name), op_id)
        for name in op.outputs:
            if name in present:
                g.edge(op_id, _node_id(name))
                produced.add(name)
        if not op.outputs:
            produced.add(op_id)
    sources = [_node_id(t.name) for t in stage.tensors
               if t.name in present and t.role in ("in", "mid", "out") and t.name not in produced]
    if not any(op.inputs for op in stage.ops):
        sources = [f"op{i}" for i, op in enumerate(stage.ops) if not op.inputs]
    sinks = [_node_id(t.name) for t in stage.tensors if t.role == "out" and t.name in present]
    sinks += [f"op{i}" for i, op in enumerate(stage.ops) if not op.outputs]
    return sources, sinks


def stage_diagram(number: int, ctx: Context) -> graphviz.Digraph:
    """One stage, inside its frames, between "..." boxes for the stages around it."""
    stage = stage_info(number)
    g = _new_graph(f"Stage {stage.number}: {stage.title}", ctx.where or "symbolic shapes (no run)")
    frames = _frames(stage, ctx)

    def nest(parent: graphviz.Digraph, depth: int):
        if depth == len(frames):
            with parent.subgraph(name="cluster_here") as here:
                here.attr(label="You are here", style="filled,dashed", fillcolor=HERE_FILL, color="#37474f",
                          fontcolor="#c62828", fontsize="14", penwidth="2", **FRAME_LABEL_ON_TOP)
                sources, sinks = _draw_stage_body(here, stage, ctx)
            if number > 1:
                parent.node("before", f"... stage {number - 1}: {stage_info(number - 1).short}",
                            fillcolor=ELSEWHERE_FILL)
                for s in sources:
                    parent.edge("before", s)
            if number < len(STAGES):
                parent.node("after", f"stage {number + 1}: {stage_info(number + 1).short} ...",
                            fillcolor=ELSEWHERE_FILL)
                for s in sinks:
                    parent.edge(s, "after")
            return
        with parent.subgraph(name=f"cluster_frame{depth}") as frame:
            frame.attr(label=frames[depth], style="filled", fillcolor=FRAME_FILL[depth % len(FRAME_FILL)],
                       color="#78909c", fontsize="14", **FRAME_LABEL_ON_TOP)
            nest(frame, depth + 1)

    nest(g, 0)
    return g


def _stage_box(stage: Stage, ctx: Context) -> str:
    rows = [f'<tr><td colspan="2" bgcolor="{OP_FILL}">{_white(f"{stage.number}. {stage.title}", bold=True)}</td></tr>']
    for spec in stage.tensors:
        record = ctx.record(stage.number, spec.name)
        if spec.role != "out" or (ctx.records is not None and record is None):
            continue
        concrete = f"{record.dtype} {_shape(record.shape)}" if record else ""
        rows.append(f'<tr><td align="left" bgcolor="{TENSOR_FILL["out"]}">{_white(f"{spec.name} {spec.shape}")}</td>'
                    f'<td align="right" bgcolor="{TENSOR_FILL["out"]}">{_white(concrete)}</td></tr>')
    return f'<<table border="0" cellborder="0" cellspacing="1" cellpadding="3">{"".join(rows)}</table>>'


def model_diagram(ctx: Context) -> graphviz.Digraph:
    """The complete model: the 19 stages in their frames, with the two loops."""
    g = _new_graph("The complete model: 19 stages", ctx.where or "symbolic shapes (no run)")
    g.attr("node", shape="plain", style="")
    with g.subgraph(name="cluster_engine") as engine:
        engine.attr(label="Inference engine", style="filled", fillcolor=FRAME_FILL[0], color="#78909c",
                    fontsize="14", **FRAME_LABEL_ON_TOP)
        for n in (1, 2, 3):
            engine.node(f"s{n}", _stage_box(stage_info(n), ctx))
        with engine.subgraph(name="cluster_model") as model:
            model.attr(label=f"Transformer Model: {ctx.model_name}", fillcolor=FRAME_FILL[1])
            for n in (4, 19):
                model.node(f"s{n}", _stage_box(stage_info(n), ctx))
            with model.subgraph(name="cluster_block") as block:
                block.attr(label=f"Transformer Block (Layer {ctx.layer}; L blocks in all)", fillcolor=FRAME_FILL[2])
                for n in (5, 6, 15, 16, 18):
                    block.node(f"s{n}", _stage_box(stage_info(n), ctx))
                with block.subgraph(name="cluster_attention") as attention:
                    attention.attr(label=MODULES[range(8, 15)], fillcolor=FRAME_FILL[0])
                    for n in range(7, 15):
                        attention.node(f"s{n}", _stage_box(stage_info(n), ctx))
                with block.subgraph(name="cluster_ffn") as ffn:
                    ffn.attr(label=MODULES[range(17, 18)], fillcolor=FRAME_FILL[0])
                    ffn.node("s17", _stage_box(stage_info(17), ctx))
    for n in range(1, 19):
        g.edge(f"s{n}", f"s{n + 1}")
    g.edge("s18", "s5", label="next block", style="dashed", constraint="false")
    g.edge("s19", "s3", label="next token", style="dashed", constraint="false")
    return g


def drawing(number: int | None, trace: Trace | None, step: int = 0, layer: int = 0) -> graphviz.Digraph:
    """Stage `number`, or the complete model when None; with a trace's dtypes and shapes when given."""
    if trace is None:
        ctx = Context("any LLaMA model", layer)
    else:
        ctx = Context(trace.model_name, layer, trace.select(step, layer), trace.describe(step, layer))
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

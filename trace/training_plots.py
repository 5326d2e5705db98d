"""Matplotlib figures of a training trace: the loss over the steps, the gradient norms by layer and
stage, one weight's update as a heatmap; and for one stage, a tensor beside its gradient."""
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from stages import UserError
from stages.training import LAYER_WEIGHTS
from stages.training_stages import grad_name, update_name

from .plots import DPI, _image, _np, _ticks, _token_label
from .run import Trace
from .values import as_matrix

WEIGHT_STAGE = {name: stage for stage, name in LAYER_WEIGHTS}


def _figure(trace: Trace, width: float, height: float, title: str, where: str) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.suptitle(f"{title}\n{where} · {trace.model_name}", fontsize=11)
    return fig


def _gradient_of(trace: Trace, stage: int, step: int, layer: int):
    """The gradient record a stage is pictured by: its main tensor's, else its last output's that has one."""
    records = {r.name: r for r in trace.select(step, layer, stage)}
    s = trace.stage(stage)
    for name in (s.main, *(t.name for t in reversed(s.tensors) if t.role in ("out", "mid"))):
        if grad_name(name) in records:
            return records[name], records[grad_name(name)]
    return None, None


def grad_norms(trace: Trace, step: int) -> tuple[np.ndarray, list[int]]:
    """(L, stages) norms of ∂loss/∂ the tensor each block stage (6 to 18) is pictured by, at `step`."""
    numbers = [s.number for s in trace.stages if s.scope == "layer" and s.number != 5]
    norms = np.full((trace.config.n_layers, len(numbers)), np.nan)
    for layer in range(trace.config.n_layers):
        for j, number in enumerate(numbers):
            _, grad = _gradient_of(trace, number, step, layer)
            if grad is not None and grad.norm is not None:
                norms[layer, j] = grad.norm
    return norms, numbers


def training_figure(trace: Trace, step: int, layer: int, weight: str) -> Figure:
    """The loss and gradient norm over the steps; the gradient norms of step `step` by layer and stage;
    AdamW's update of `weight` in `layer` at that step."""
    log = trace.training
    fig = _figure(trace, 16, 6, "What changes when the model learns", trace.describe(step, layer))
    loss_ax, norms_ax, update_ax = fig.subplots(1, 3, width_ratios=(1, 1.2, 1.2))
    steps = range(len(log.steps))
    loss_ax.plot(steps, [s.loss for s in log.steps], "o-", color="#c62828", label="loss")
    loss_ax.set_xlabel("training step")
    loss_ax.set_ylabel("loss (mean cross-entropy)", color="#c62828")
    loss_ax.set_xticks(list(steps))
    norm_ax = loss_ax.twinx()
    norm_ax.plot(steps, [s.grad_norm for s in log.steps], "s--", color="#1565c0")
    norm_ax.set_ylabel("gradient norm, before clipping", color="#1565c0")
    loss_ax.set_title("Loss and gradient norm over the steps", fontsize=10)

    norms, numbers = grad_norms(trace, step)
    shown = norms[np.isfinite(norms) & (norms > 0)]
    scale = LogNorm(vmin=shown.min(), vmax=shown.max()) if shown.size else None
    _image(norms_ax, norms, f"‖∂loss/∂‖ at step {step}, by layer and stage", cmap="magma", center=False,
           norm=scale)
    norms_ax.set_xticks(range(len(numbers)), [trace.stage(n).short for n in numbers], rotation=90, fontsize=7)
    norms_ax.set_ylabel("layer")

    stage = WEIGHT_STAGE[weight]
    record = trace.record(stage, update_name(weight), step, layer)
    if record.values is None:
        raise UserError(f"the trace kept no values of {weight}'s update at step {step}, layer {layer} "
                        f"(train with --step {step} --layer {layer}, or --capture all)")
    values = record.values if record.values.dim() == 2 else record.values.reshape(1, -1)
    rows, cols = values.shape
    _image(update_ax, _np(values), f"{weight}.update = new − old, rows 0-{rows - 1}, columns 0-{cols - 1} "
                                   f"of {tuple(record.shape)}")
    update_ax.set_xlabel("input column")
    update_ax.set_ylabel("output row")
    return fig


def training_stage_figure(trace: Trace, stage: int, step: int, layer: int, head: int) -> Figure:
    """A stage's tensor in the forward pass beside ∂loss/∂ it in the backward pass (batch row 0)."""
    forward, grad = _gradient_of(trace, stage, step, layer)
    if forward is None:
        raise UserError(f"stage {stage} has no gradient to show (its tensors are token ids): try a stage from 4 to 19")
    if forward.values is None or grad.values is None:
        raise UserError(f"the trace kept no values of stage {stage} at step {step}, layer {layer}")
    s = trace.stage(stage)
    fig = _figure(trace, 16, 7, f"Stage {stage}: {s.title}", trace.describe(step, layer))
    offset, seq = trace.training.steps[step].offset, trace.training.setup.seq
    tokens = [_token_label(trace.piece(i)) for i in trace.prompt_ids[offset:offset + seq]]
    for ax, record, title in zip(fig.subplots(1, 2), (forward, grad), ("forward", "backward: ∂loss/∂")):
        matrix, rows, cols, what = as_matrix(record, head, trace.config.n_rep)
        if matrix.is_complex():
            matrix = matrix.abs()
        _image(ax, _np(matrix), f"{title} {record.name} {what}")
        if rows == "T":
            _ticks(ax, "y", tokens)
        ax.set_ylabel(rows)
        ax.set_xlabel(cols)
    return fig

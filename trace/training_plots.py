"""Matplotlib figures of a training trace: the loss over the steps, the gradient norms by layer and
stage, one weight's update as a heatmap; and for one stage, a tensor beside its gradient."""
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from stages import UserError
from stages.training import LAYER_WEIGHTS
from stages.training_stages import check_has_gradient, grad_name, update_name

from .plots import DPI, _image, _np, _ticks, _token_label
from .run import Trace
from .values import as_matrix, shape_text

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
    fig = _figure(trace, 16, 7, "What changes when the model learns", trace.describe(step, layer))
    grid = fig.add_gridspec(1, 3, width_ratios=(1, 1.2, 1.2))
    left = grid[0, 0].subgridspec(2, 1)
    loss_ax = fig.add_subplot(left[0])
    norm_ax = fig.add_subplot(left[1], sharex=loss_ax)
    norms_ax, update_ax = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[0, 2])
    steps = list(range(len(log.steps)))
    loss_ax.plot(steps, [s.loss for s in log.steps], "o-", color="#c62828")
    loss_ax.set_ylabel("loss (mean cross-entropy)")
    loss_ax.set_title("Loss over the steps" + ("" if log.setup.same_batch else " (each step: the next batch)"),
                      fontsize=10)
    norm_ax.plot(steps, [s.grad_norm for s in log.steps], "s-", color="#1565c0")
    norm_ax.set_ylabel("gradient norm")
    norm_ax.set_title("Total gradient norm, before clipping" +
                      (f" (clipped to {log.setup.clip:g})" if log.setup.clip else ""), fontsize=10)
    norm_ax.set_xlabel("training step")
    norm_ax.set_xticks(steps)

    norms, numbers = grad_norms(trace, step)
    shown = norms[np.isfinite(norms) & (norms > 0)]
    scale = LogNorm(vmin=shown.min(), vmax=shown.max()) if shown.size else None
    _image(norms_ax, norms, f"‖∂loss/∂ each stage's tensor‖ at step {step}, by layer", cmap="magma",
           center=False, norm=scale)
    norms_ax.set_xticks(range(len(numbers)), [trace.stage(n).short for n in numbers], rotation=90, fontsize=7)
    norms_ax.set_ylabel("layer")

    stage = WEIGHT_STAGE[weight]
    record = trace.record(stage, update_name(weight), step, layer)
    if record.values is None:
        raise UserError(f"the trace kept no values of {weight}'s update at step {step}, layer {layer} ("
                        f"{trace.why_not_kept(record) or f'train with --step {step} --layer {layer}, or --capture all'})")
    title = f"{weight}.update = new − old, layer {layer}"
    if record.values.dim() == 1:  # a norm's weight: one number per channel
        values = _np(record.values)
        update_ax.bar(range(len(values)), values, color=np.where(values < 0, "#1565c0", "#c62828"))
        update_ax.axhline(0, color="black", linewidth=0.5)
        update_ax.set_title(f"{title}, elements 0-{len(values) - 1} of {shape_text(record.shape)}", fontsize=10)
        update_ax.set_xlabel("element")
        return fig
    rows, cols = record.values.shape
    _image(update_ax, _np(record.values), f"{title}, rows 0-{rows - 1}, columns 0-{cols - 1} of {shape_text(record.shape)}")
    update_ax.set_xlabel("input column")
    update_ax.set_ylabel("output row")
    return fig


def training_stage_figure(trace: Trace, stage: int, step: int, layer: int, head: int) -> Figure:
    """A stage's tensor in the forward pass beside ∂loss/∂ it in the backward pass (batch row 0)."""
    check_has_gradient(stage)
    forward, grad = _gradient_of(trace, stage, step, layer)
    if forward.values is None or grad.values is None:
        why = trace.why_not_kept(forward if forward.values is None else grad)
        raise UserError(f"the trace kept no values of stage {stage} at step {step}, layer {layer}" +
                        (f" ({why})" if why else ""))
    s = trace.stage(stage)
    fig = _figure(trace, 16, 7, f"Stage {stage}: {s.title}", trace.describe(step, layer if s.scope == "layer" else None))
    offset, seq = trace.training.steps[step].offset, trace.training.setup.seq
    tokens = [_token_label(trace.piece(i)) for i in trace.prompt_ids[offset:offset + seq]]
    for ax, record, title in zip(fig.subplots(1, 2), (forward, grad), ("forward:", "backward: ∂loss/∂")):
        matrix, rows, cols, what = as_matrix(record, head, trace.config.n_rep)
        if matrix.is_complex():
            matrix = matrix.abs()
        title = f"{title} {forward.name} {what}"
        if record is grad and matrix.numel() > 1 and bool((matrix == matrix.flatten()[0]).all()):
            title += f"\nthe same everywhere: {matrix.flatten()[0].item():.4g}"  # (a mean's: 1/(B·T))
        _image(ax, _np(matrix), title)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if rows == "T":
            _ticks(ax, "y", tokens)
        ax.set_ylabel(rows)
        ax.set_xlabel(cols)
    return fig

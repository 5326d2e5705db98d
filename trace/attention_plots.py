"""What the heads attend to, read off the recorded softmax (stage 13): where the newest token
looks in chosen layers, and how much of all attention goes to the first position (the sink)."""
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from stages.tensor_ids import ATTENTION_WEIGHTS, BLOCK_OUTPUT

from .plots import DPI, _image, _ticks, _token_label
from .run import Trace


def attention_rows_figure(trace: Trace, step: int, layers: list[int]) -> Figure:
    """For each layer in `layers`: every head's attention from the last position of `step` (the
    token whose next token this step chooses) over every key position."""
    P, T = trace.positions(step)
    keys = [_token_label(trace.piece(i)) for i in (trace.prompt_ids + trace.new_ids)[:P + T]]
    chosen = trace.piece(trace.new_ids[step])
    fig = Figure(figsize=(16, 2.6 * len(layers) + 1.2), dpi=DPI, layout="constrained")
    fig.suptitle(f"Where the heads look when choosing {chosen!r} (step {step}: query = the last position, "
                 f"{keys[-1]!r})\n{trace.model_name}", fontsize=11)
    for row, layer in enumerate(layers):
        ax = fig.add_subplot(len(layers), 1, row + 1)
        probs = trace.values(*ATTENTION_WEIGHTS, step=step, layer=layer)[:, -1, :]  # (H, P+T)
        _image(ax, probs.float().numpy(), f"layer {layer}", cmap="viridis", center=False, vmin=0)
        ax.set_ylabel("query head")
        ax.set_yticks(range(probs.shape[0]))
        _ticks(ax, "x", keys)
    ax.set_xlabel("key position (the token looked at)")
    return fig


def sink_shares(trace: Trace, step: int = 0) -> np.ndarray:
    """(L, H): the share of attention each head gives to key position 0, averaged over the step's
    queries (the first query, which can only look at itself, left out)."""
    rows = []
    for layer in range(trace.config.n_layers):
        probs = trace.values(*ATTENTION_WEIGHTS, step=step, layer=layer).float()  # (H, T, P+T)
        queries = probs[:, 1:, :] if probs.shape[1] > 1 else probs
        rows.append(queries[:, :, 0].mean(dim=1).numpy())
    return np.stack(rows)


def stream_sizes(trace: Trace, step: int = 0) -> np.ndarray:
    """(L, T): the size ‖out‖ of the residual stream after each block, at each position of the step."""
    return np.stack([trace.values(*BLOCK_OUTPUT, step=step, layer=layer).norm(dim=-1).numpy()
                     for layer in range(trace.config.n_layers)])


def sink_figure(trace: Trace, step: int = 0) -> Figure:
    """The first position's outsized stream (the bright column) next to the attention it draws."""
    shares, sizes = sink_shares(trace, step), stream_sizes(trace, step)
    P, T = trace.positions(step)
    fig = Figure(figsize=(16, 7), dpi=DPI, layout="constrained")
    fig.suptitle(f"Position 0 ({trace.piece(trace.prompt_ids[0])!r}): a huge residual stream, and most of the "
                 f"attention\nstep {step} · {trace.model_name}", fontsize=11)
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    _image(left, sizes, "‖out‖ after each block, per position (log colour scale)", center=False, norm=LogNorm())
    _ticks(left, "x", [_token_label(trace.piece(i)) for i in (trace.prompt_ids + trace.new_ids)[P:P + T]], P)
    left.set_ylabel("layer")
    left.set_xlabel("position")
    _image(right, shares, "share of each head's attention on position 0", cmap="magma", center=False, vmin=0, vmax=1)
    right.set_xlabel("query head")
    right.set_ylabel("layer")
    return fig

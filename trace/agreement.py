"""How closely a trace agrees with a reference's values of the same tensors, stage by stage
and layer by layer, as numbers and as one picture."""
import math

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from .run import Trace

FLOOR = 1e-9  # a difference of exactly 0 is drawn as this, on the logarithmic colour scale


def relative_differences(trace: Trace, reference: dict[tuple[int, str, int | None], torch.Tensor],
                         step: int = 0) -> dict[tuple[int, str], dict[int | None, float]]:
    """(stage, tensor) -> {layer: max |ours - reference| / max |reference|} over the reference's tensors."""
    found: dict[tuple[int, str], dict[int | None, float]] = {}
    for (stage, name, layer), want in sorted(reference.items(), key=lambda kv: kv[0][0]):
        got = trace.values(stage, name, step=step, layer=layer or 0).reshape(want.shape)
        scale = want.abs().max().item()
        difference = (got.double() - want.double()).abs().max().item()
        found.setdefault((stage, name), {})[layer] = difference / scale if scale else difference
    return found


def agreement_figure(differences: dict[tuple[int, str], dict[int | None, float]], n_layers: int,
                     bound: float) -> Figure:
    """One row per (stage, tensor), one column per layer (tensors made once per step fill their
    row), coloured by the relative difference on a log scale; the bound is marked on the colour bar."""
    rows = list(differences)
    matrix = np.full((len(rows), n_layers), np.nan)
    for i, key in enumerate(rows):
        for layer, value in differences[key].items():
            matrix[i, slice(None) if layer is None else layer] = max(value, FLOOR)
    top = max(bound * 10, np.nanmax(matrix))
    fig = Figure(figsize=(9, 0.3 * len(rows) + 1.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", norm=LogNorm(FLOOR, top), interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"{stage} · {name}" for stage, name in rows], fontsize=8)
    every = max(1, math.ceil(n_layers / 30))
    ax.set_xticks(range(0, n_layers, every), [str(i) for i in range(0, n_layers, every)], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("stage · tensor")
    worst = np.nanmax(matrix)
    ax.set_title(f"Largest difference from the reference, relative to the tensor's largest value\n"
                 f"worst {worst:.1e}, bound {bound:.0e}: {'every tensor within it' if worst < bound else 'EXCEEDED'}",
                 fontsize=10)
    bar = fig.colorbar(image, ax=ax)
    bar.ax.axhline(bound, color="red", linewidth=2)
    bar.set_label("relative difference (red: the bound)")
    return fig

"""RoPE's geometry, from the recorded freqs_cis (stage 10): how fast each pair turns, and one
pair's rotation factor walking round the unit circle as the position grows."""
import numpy as np
from matplotlib.figure import Figure

from stages.tensor_ids import FREQS_CIS

from .plots import DPI
from .run import Trace


def rotation_speeds(trace: Trace) -> np.ndarray:
    """θ_i of every pair i, in radians per position: the angle freqs_cis turns from position 0 to 1."""
    freqs_cis = trace.values(*FREQS_CIS, step=0).numpy()  # (T, Dh/2), complex
    return np.angle(freqs_cis[1] / freqs_cis[0])


def rope_figure(trace: Trace, pairs: tuple[int, ...] | None = None) -> Figure:
    """θ_i for this model, and for a fast and a slow pair the rotation exp(j·pos·θ_i) applied at
    each position of the prompt step."""
    freqs_cis = trace.values(*FREQS_CIS, step=0).numpy()  # (T, Dh/2)
    theta = rotation_speeds(trace)
    pairs = pairs or (0, len(theta) // 4)
    fig = Figure(figsize=(15, 5), dpi=DPI, layout="constrained")
    fig.suptitle(f"RoPE: pair i turns by θ_i per position (θ_i = {trace.config.rope_theta:g}^(-2i/Dh)); "
                 f"the rotations applied at the {len(freqs_cis)} prompt positions · {trace.model_name}", fontsize=11)
    grid = fig.add_gridspec(1, 1 + len(pairs))
    ax = fig.add_subplot(grid[0, 0])
    ax.semilogy(range(len(theta)), theta, "o", markersize=3, color="#1e88e5", label="θ_i (radians per position)")
    ax.semilogy(range(len(theta)), 2 * np.pi / theta, "o", markersize=3, color="#c62828",
                label="2π/θ_i (positions per full turn)")
    ax.set_xlabel("pair i (dimensions 2i, 2i+1)")
    ax.legend(fontsize=8)
    for col, i in enumerate(pairs, 1):
        ax = fig.add_subplot(grid[0, col], aspect="equal")
        circle = np.exp(1j * np.linspace(0, 2 * np.pi, 200))
        ax.plot(circle.real, circle.imag, color="#cfd8dc")
        points = freqs_cis[:, i]
        scatter = ax.scatter(points.real, points.imag, c=range(len(points)), cmap="viridis", s=25, zorder=3)
        for pos in range(min(4, len(points))):
            ax.annotate(f"pos {pos}", (points[pos].real, points[pos].imag), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_title(f"pair {i}: θ = {theta[i]:.3g} rad per position,\na full turn every "
                     f"{2 * np.pi / theta[i]:.3g} positions", fontsize=9)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        fig.colorbar(scatter, ax=ax, fraction=0.04, label="position")
    return fig

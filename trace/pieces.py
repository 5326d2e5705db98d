"""Tokenization as the model sees it: the templated prompt as coloured pieces, each with its id."""
from matplotlib.figure import Figure

from .plots import DPI
from .run import Trace

COLOURS = ("#bbdefb", "#c8e6c9", "#ffe0b2", "#e1bee7", "#ffcdd2", "#b2ebf2")
LINE_CHARS = 90  # a line of pieces holds about this many characters


def _shown(piece: str) -> str:
    return piece.replace(" ", "␣").replace("\n", "↵")  # spaces and newlines are part of pieces: make them visible


def pieces_figure(trace: Trace) -> Figure:
    """The prompt's pieces in order, coloured in turn, their ids underneath; wrapped like text,
    with a new line after each newline piece."""
    cells, line, width = [], 0, 0
    for i, token in enumerate(trace.prompt_ids):
        text = _shown(trace.piece(token))
        chars = max(len(text), len(str(token))) + 1
        if width + chars > LINE_CHARS:
            line, width = line + 1, 0
        cells.append((line, width, text, token, i))
        width += chars
        if "\n" in trace.piece(token):
            line, width = line + 1, 0
    lines = cells[-1][0] + 1
    fig = Figure(figsize=(9.5, 0.55 * lines + 0.9), dpi=DPI, layout="constrained")
    fig.suptitle(f"The templated prompt as {len(trace.prompt_ids)} pieces (␣ = space, ↵ = newline), each with its "
                 f"id\n{trace.model_name}", fontsize=11)
    ax = fig.add_subplot()
    for line, col, text, token, i in cells:
        box = {"boxstyle": "round,pad=0.2", "facecolor": COLOURS[i % len(COLOURS)], "edgecolor": "none"}
        ax.text(col, -line, text, family="monospace", fontsize=10, va="bottom", bbox=box)
        ax.text(col, -line - 0.08, str(token), family="monospace", fontsize=7, va="top", color="#455a64")
    ax.set_xlim(-1, LINE_CHARS + 1)
    ax.set_ylim(-lines + 0.3, 0.8)
    ax.axis("off")
    return fig

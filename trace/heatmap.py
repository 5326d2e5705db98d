"""A small colour heatmap for the terminal, drawn with rich: each character cell
shows two values, the upper one as the colour of "▀", the lower one as its background."""
import torch
import torch.nn.functional as F
from rich.color import Color
from rich.console import Group
from rich.style import Style
from rich.text import Text

from .values import number

MAX_COLS, MAX_ROWS = 64, 24  # 24 rows of values = 12 lines
MASKED = Color.from_rgb(90, 90, 90)


def _shrink(matrix: torch.Tensor) -> torch.Tensor:
    """Block means down to at most MAX_ROWS x MAX_COLS, ignoring -inf/nan; a block of them stays nan."""
    finite = torch.isfinite(matrix)
    rows, cols = min(matrix.shape[0], MAX_ROWS), min(matrix.shape[1], MAX_COLS)
    if (rows, cols) == tuple(matrix.shape):
        return torch.where(finite, matrix, torch.nan)
    total = F.adaptive_avg_pool2d(torch.where(finite, matrix, 0.0)[None], (rows, cols))[0]
    count = F.adaptive_avg_pool2d(finite.float()[None], (rows, cols))[0]
    return torch.where(count > 0, total / count.clamp(min=1e-12), torch.nan)


def terminal_heatmap(matrix: torch.Tensor, title: str) -> Group:
    """`matrix` (rows, cols) as coloured half-blocks, blue-white-red around 0 when it has both signs."""
    values = _shrink(matrix.detach().float().cpu())
    finite = values[torch.isfinite(values)]
    lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 1.0)
    signed = lo < 0 < hi
    if signed:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    from matplotlib import colormaps  # here: matplotlib takes a quarter of a second to import
    cmap = colormaps["RdBu_r" if signed else "viridis"]

    def colour(v: float) -> Color:
        if v != v:  # nan: masked or empty
            return MASKED
        r, g, b, _ = cmap((v - lo) / (hi - lo) if hi > lo else 0.5)
        return Color.from_rgb(int(r * 255), int(g * 255), int(b * 255))

    lines = []
    for top in range(0, values.shape[0], 2):
        line = Text()
        for col in range(values.shape[1]):
            upper = colour(values[top, col].item())
            lower = colour(values[top + 1, col].item()) if top + 1 < values.shape[0] else None
            line.append("▀", Style(color=upper, bgcolor=lower))
        lines.append(line)
    shape = f"{tuple(matrix.shape)} shown as {tuple(values.shape)} block means" \
        if tuple(values.shape) != tuple(matrix.shape) else f"{tuple(matrix.shape)}"
    legend = Text.assemble(f"{number(lo, 4)} ", *(("█", Style(color=colour(lo + (hi - lo) * i / 15)))
                                                    for i in range(16)), f" {number(hi, 4)}",
                           ("   grey: -inf (masked)" if (~torch.isfinite(matrix)).any() else "", "dim"))
    return Group(Text(f"{title}  {shape}", style="bold"), *lines, legend)

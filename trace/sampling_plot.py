"""The same logits at several temperatures, with top-p's cut: what sampling draws from."""
from typing import Callable

import torch
from matplotlib.figure import Figure

from stages import Sampling
from stages.output import next_token_probs

from .plots import DPI, _token_label


def temperatures_figure(logits: torch.Tensor, temperatures: list[float], top_p: float, chosen: int,
                        piece: Callable[[int], str], k: int = 15) -> Figure:
    """One panel per temperature: the k most likely tokens (and `chosen`, wherever it ranks) before
    top-p (grey) and after it (blue; red for `chosen`), the probabilities stage 19 computes."""
    ids = torch.topk(logits, k).indices.tolist()
    if chosen not in ids:
        ids[-1] = chosen
    fig = Figure(figsize=(5 * len(temperatures), 6), dpi=DPI, layout="constrained")
    fig.suptitle(f"The same logits at {len(temperatures)} temperatures; top-p = {top_p} keeps the most likely "
                 f"tokens up to that mass (grey: cut off). {_token_label(piece(chosen))!r} in red", fontsize=11)
    labels = [f"{_token_label(piece(i))} ({i})" for i in ids]
    for col, temperature in enumerate(temperatures):
        ax = fig.add_subplot(1, len(temperatures), col + 1)
        before = next_token_probs(logits, Sampling(temperature=temperature))[ids].numpy()
        after = next_token_probs(logits, Sampling(temperature=temperature, top_p=top_p))
        kept = int((after > 0).sum())
        colours = ["#1e88e5" if after[i] > 0 else "#b0bec5" for i in ids]
        bars = ax.barh(range(len(ids)), before, color=colours)
        chosen_bar = bars[ids.index(chosen)]
        chosen_bar.set(edgecolor="#c62828", linewidth=2.5, hatch="//" if after[chosen] == 0 else None)
        if after[chosen] > 0:
            chosen_bar.set_facecolor("#c62828")
        ax.set_yticks(range(len(ids)), labels if col == 0 else [""] * len(ids), fontsize=8)
        if col == 0:
            ax.get_yticklabels()[ids.index(chosen)].set(color="#c62828", fontweight="bold")
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(min(before.min(), 1e-6) / 10, 1.5)
        ax.set_title(f"T = {temperature}: top-p keeps {kept} token{'s' if kept != 1 else ''}", fontsize=10)
        ax.set_xlabel("probability before top-p (log scale)")
    return fig

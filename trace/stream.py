"""The residual stream across layers: what each block reads from it and adds to it, and what the
model would say if it stopped after any layer (the logit lens, computed by stages.logit_lens)."""
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure

from stages.tensor_ids import ATTENTION_ADDED, BLOCK_OUTPUT, EMBEDDINGS, FFN_ADDED, STREAM_READ

from .plots import DPI, _token_label
from .run import Trace


def stream_rows(trace: Trace, step: int, position: int = -1) -> torch.Tensor:
    """(L+1, D): the stream at one position of `step` (default: its last) as the embedding made it
    (stage 4) and after each block (stage 18's out)."""
    rows = [trace.values(*EMBEDDINGS, step=step)[position]]
    rows += [trace.values(*BLOCK_OUTPUT, step=step, layer=layer)[position] for layer in range(trace.config.n_layers)]
    return torch.stack(rows)


def stream_writes(trace: Trace, step: int, position: int = -1) -> dict[str, np.ndarray]:
    """Per layer, at one position: the size of the stream the block reads (‖x‖), of what attention
    adds (stage 15) and what the FFN adds (stage 18), and the size of the stream after the block."""
    layers = range(trace.config.n_layers)

    def sizes(stage: int, name: str) -> np.ndarray:
        return np.array([trace.values(stage, name, step=step, layer=layer)[position].norm().item() for layer in layers])

    return {"stream read": sizes(*STREAM_READ), "attention adds": sizes(*ATTENTION_ADDED),
            "FFN adds": sizes(*FFN_ADDED), "stream after": sizes(*BLOCK_OUTPUT)}


def _where(trace: Trace, step: int, position: int) -> str:
    P, T = trace.positions(step)
    index = P + (position % T)
    piece = _token_label(trace.piece((trace.prompt_ids + trace.new_ids)[index]))
    return f"step {step}, position {index} ({piece!r}) · {trace.model_name}"


def residual_stream_figure(trace: Trace, step: int = 0, position: int = -1) -> Figure:
    """One picture of the residual stream: block by block, the size of what it holds and of what
    attention and the FFN write into it."""
    writes = stream_writes(trace, step, position)
    fig = Figure(figsize=(12, 5.5), dpi=DPI, layout="constrained")
    fig.suptitle("The residual stream: each block reads it (x), and adds attention's output, then the FFN's\n"
                 + _where(trace, step, position), fontsize=11)
    ax = fig.add_subplot()
    layers = np.arange(trace.config.n_layers)
    ax.plot(layers, writes["stream read"], "o-", color="#d32f2f", label="‖x‖: the stream each block reads")
    ax.bar(layers - 0.2, writes["attention adds"], 0.4, color="#1e88e5", label="‖attention output‖: added at stage 15")
    ax.bar(layers + 0.2, writes["FFN adds"], 0.4, color="#1b7a3a", label="‖ffn output‖: added at stage 18")
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer (block)")
    ax.set_ylabel("vector size ‖·‖ (log scale)")
    ax.legend(fontsize=9, loc="upper left")
    return fig


def logit_lens_figure(trace: Trace, lens_logits: torch.Tensor, target: int, step: int = 0, top: int = 5,
                      piece: Callable[[int], str] | None = None) -> Figure:
    """`lens_logits` (L+1, V) of stages.logit_lens on stream_rows(trace, step): per layer the most
    likely tokens and their probabilities, and the probability and rank of token `target`. `piece`
    gives a token's text (the model tokenizer's; the trace keeps only the texts it showed)."""
    piece = piece or trace.piece
    probs = torch.softmax(lens_logits.float(), dim=-1)
    best = torch.topk(probs, top)
    labels = ["embedding"] + [f"after block {layer}" for layer in range(trace.config.n_layers)]
    fig = Figure(figsize=(15, 0.28 * len(labels) + 1.8), dpi=DPI, layout="constrained")
    fig.suptitle(f"The logit lens: the final norm and output head applied after every block, at step {step}'s "
                 f"last position\n(the last row is the model's own output) · {trace.model_name}", fontsize=11)
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    left.imshow(best.values.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for row in range(len(labels)):
        for col in range(top):
            token, p = best.indices[row, col].item(), best.values[row, col].item()
            left.text(col, row, f"{_token_label(piece(token))} {p:.2f}", ha="center", va="center", fontsize=7,
                      color="#c62828" if token == target else ("white" if p > 0.5 else "black"),
                      fontweight="bold" if token == target else "normal")
    left.set_yticks(range(len(labels)), labels, fontsize=7)
    left.set_xticks(range(top), [f"#{i + 1}" for i in range(top)])
    left.set_xlabel("most likely next tokens, by rank (colour: probability)")
    target_p = np.maximum(probs[:, target].numpy(), 1e-12)  # drawn from 1e-12 up
    rank = (probs > probs[:, target:target + 1]).sum(dim=-1).numpy() + 1
    right.plot(target_p, range(len(labels)), "o-", color="#c62828")
    right.set_xscale("log")
    right.set_xlim(1e-12, 2)
    right.set_ylim(len(labels) - 0.5, -0.5)
    right.set_yticks(range(len(labels)), [f"rank {r}" for r in rank], fontsize=7)
    right.set_xlabel(f"probability of {_token_label(piece(target))!r} (log scale)")
    return fig

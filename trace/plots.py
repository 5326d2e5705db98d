"""Matplotlib figures of a trace, for the stages where a picture teaches most;
every other stage gets a heatmap of its main tensor. Axes are labelled with the
real tokens, positions, heads and dimensions."""
import io
import math
import warnings

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from stages import UserError
from stages.tensor_ids import (ATTENTION_WEIGHTS, BLOCK_OUTPUT, CACHE_K, EMBEDDINGS, FREQS_CIS, KEYS, KEYS_REPEATED, NEXT_TOKEN,
                              NEXT_TOKEN_PROBS, SCORES, STREAM_AFTER_ATTENTION)

from .recorder import Ranges, Rule, TensorRecord
from .run import Trace
from .values import as_matrix

DPI = 100
PLOT_FORMATS = ("png", "svg", "pdf")
MAX_TICKS = 40  # at most this many labels on an axis: beyond, every k-th
TICK_FONT = 7
CLIP_PERCENTILE = 99.5
FIGURE_NEEDS = {10: {"freqs_cis", "xq (reshaped)", "xq (rotated)"}, 17: {"gate", "up", "gate * up"}}


def rules_for_plot(stage: int, step: int, layer: int) -> tuple[Rule, ...]:
    """What a run must keep, beyond the shown step and layer, for the figure of `stage`."""
    if stage in (15, 18):  # the residual stream of every layer at this step
        return (Rule(stages=Ranges.of(4, 15, 18), steps=Ranges.of(step)),)
    if stage in (11, 12):  # the cache of this layer at every step
        return (Rule(stages=Ranges.of(11), layers=Ranges.of(layer)),)
    return ()


def _token_label(piece: str) -> str:
    text = repr(piece)[1:-1]
    return text if len(text) <= 12 else text[:11] + "…"


def _room(ax, axis: str) -> int:
    """How many tick labels fit along an axis without touching."""
    box = ax.get_position()  # in figure fractions; the layout engine later trims it a little
    width, height = ax.figure.get_size_inches()
    inches = box.height * height if axis == "y" else box.width * width
    return max(2, int(inches * 72 * 0.85 / (TICK_FONT * 1.5)))


def _ticks(ax, axis: str, labels: list[str], start: int = 0, numbered: bool = True) -> None:
    """Label an image axis with `labels` (after their position number), every k-th one only
    when they would not fit, so that they never overlap."""
    every = max(1, math.ceil(len(labels) / min(MAX_TICKS, _room(ax, axis))))
    positions = list(range(0, len(labels), every))
    text = [labels[i] if not numbered else f"{start + i}: {labels[i]}" if labels[i] else str(start + i)
            for i in positions]
    if axis == "y":
        ax.set_yticks(positions, text, fontsize=TICK_FONT)
    else:
        ax.set_xticks(positions, text, fontsize=TICK_FONT, rotation=90)


def _colormap(name: str):
    return colormaps[name].with_extremes(bad="#b0b0b0")  # -inf (masked) and empty places are grey


def _image(ax, matrix: np.ndarray, title: str, cmap: str | None = None, center: bool | None = None, **kw):
    finite = matrix[np.isfinite(matrix)]
    if center is None:
        center = finite.size > 0 and finite.min() < 0 < finite.max()
    if center and finite.size:
        bound = float(np.abs(finite).max()) or 1.0
        typical = float(np.percentile(np.abs(finite), CLIP_PERCENTILE))
        if 0 < typical < bound / 5:
            # A few huge outliers (LLMs have some) would leave everything else white.
            bound = typical
            title += f"  [colours clipped at ±{typical:.3g}; max |value| {float(np.abs(finite).max()):.3g}]"
        kw.setdefault("vmin", -bound)
        kw.setdefault("vmax", bound)
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest",
                   cmap=_colormap(cmap or ("RdBu_r" if center else "viridis")), **kw)
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    return im


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


class Figures:
    """The figure for one stage of one trace at a step, layer and head."""

    def __init__(self, trace: Trace, step: int, layer: int, head: int):
        self.trace, self.step, self.layer, self.head = trace, step, layer, head
        self.config = trace.config
        self.P, self.T = trace.positions(step)
        ids = trace.prompt_ids + trace.new_ids
        self.pieces = [_token_label(trace.piece(i)) for i in ids]
        self.where = trace.describe(step, layer)

    def figure(self, width: float, height: float, title: str) -> Figure:
        # A bare Figure, not pyplot's: no window, no global state, nothing to close; Jupyter shows it.
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        fig.suptitle(f"{title}\n{self.where} · {self.trace.model_name}", fontsize=11)
        return fig

    def get(self, stage: int, name: str, layer: int | None = None, step: int | None = None) -> TensorRecord:
        """A record with kept values; the figure's own step and layer unless others are given."""
        record = self.trace.record(stage, name, self.step if step is None else step,
                                   self.layer if layer is None else layer)
        if record.values is None:
            raise UserError(f"the trace kept no values of stage {stage} {name!r} at step {record.step}, "
                            f"layer {record.layer}")
        return record

    def new_tokens(self) -> list[str]:
        return self.pieces[self.P:self.P + self.T]

    # Stage 4 -------------------------------------------------------------
    def embeddings(self) -> Figure:
        fig = self.figure(14, 7, "Stage 4: the embedding vector of each token fed (rows of tok_embeddings)")
        ax = fig.add_subplot()
        _image(ax, _np(self.get(*EMBEDDINGS).values), "x (T, D)")
        _ticks(ax, "y", self.new_tokens(), self.P)
        ax.set_xlabel("dimension (D)")
        return fig

    # Stage 10 ------------------------------------------------------------
    def rotary(self) -> Figure:
        kv_head = self.head // self.config.n_rep
        fig = self.figure(16, 9, f"Stage 10: rotary embeddings (interleaved pairs), query head {self.head}, "
                                 f"its KV head {kv_head}")
        grid = fig.add_gridspec(2, 3)
        freqs = self.get(*FREQS_CIS).values
        angles = np.angle(freqs.numpy()) % (2 * np.pi)
        ax = fig.add_subplot(grid[:, 0])
        _image(ax, angles, "rotation angle pos·θ_i (mod 2π)", cmap="twilight", center=False, vmin=0, vmax=2 * np.pi)
        _ticks(ax, "y", self.new_tokens(), self.P)
        ax.set_xlabel("pair i (dimensions 2i, 2i+1)")
        for row, (name, head) in enumerate((("xq", self.head), ("xk", kv_head))):
            for col, (suffix, label) in enumerate((("reshaped", "before"), ("rotated", "after"))):
                ax = fig.add_subplot(grid[row, col + 1])
                values = _np(self.get(10, f"{name} ({suffix})").values[:, head, :])
                _image(ax, values, f"{name} {label} rotation, head {head} (T, Dh)")
                _ticks(ax, "y", self.new_tokens(), self.P)
                ax.set_xlabel("dimension (Dh)")
        return fig

    # Stages 11 and 12 ----------------------------------------------------
    def kv_cache(self) -> Figure:
        fig = self.figure(16, 7, f"Stages 11-12: the KV cache of layer {self.layer} filling up, and which query "
                                 f"heads share each KV head")
        grid = fig.add_gridspec(1, 3)
        steps = self.trace.n_steps
        width = self.trace.positions(steps - 1)[0] + self.trace.positions(steps - 1)[1]
        filled = np.full((steps, width), np.nan)
        for s in range(steps):
            cache_k = self.get(*CACHE_K, step=s).values  # (P+T, Hkv, Dh)
            filled[s, :cache_k.shape[0]] = _np(cache_k.norm(dim=-1).mean(dim=-1))
        ax = fig.add_subplot(grid[0, :2])
        _image(ax, filled, "‖key‖ per cached position (mean over KV heads); grey: not yet written")
        ax.set_ylabel("step")
        _ticks(ax, "y", [""] * steps)
        _ticks(ax, "x", self.pieces[:width])
        keys = self.get(*KEYS).values  # (P+T, Hkv, Dh)
        repeated = self.get(*KEYS_REPEATED).values  # (P+T, H, Dh)
        shares = np.array([[float(torch.equal(repeated[:, h], keys[:, j])) for j in range(keys.shape[1])]
                           for h in range(repeated.shape[1])])
        ax = fig.add_subplot(grid[0, 2])
        _image(ax, shares, "query head h reads KV head j (from the values)", cmap="Greens", center=False)
        ax.set_xlabel("KV head")
        ax.set_ylabel("query head")
        ax.set_xticks(range(shares.shape[1]))
        ax.set_yticks(range(shares.shape[0]))
        return fig

    # Stage 13 ------------------------------------------------------------
    def scores(self) -> Figure:
        scores = self.get(*SCORES).values  # (H, T, P+T), -inf where masked
        probs = self.get(*ATTENTION_WEIGHTS).values
        keys = self.pieces[:self.P + self.T]
        if self.T == 1:  # decode: one query row per head over every cached position
            fig = self.figure(16, 8, "Stage 13: the new token's scores over every cached position, per head")
            for row, (matrix, title) in enumerate(((scores, "scores = xq · keysᵀ / √Dh"),
                                                   (probs, "softmax(scores)"))):
                ax = fig.add_subplot(2, 1, row + 1)
                _image(ax, _np(matrix[:, 0, :]), title)
                ax.set_ylabel("head")
                ax.set_yticks(range(matrix.shape[0]))
                _ticks(ax, "x", keys)
                ax.set_xlabel("key position (the token looked at)")
            return fig
        fig = self.figure(18, 11, f"Stage 13: attention scores before and after softmax (head {self.head} large, "
                                  f"then every head); grey = masked (-inf)")
        n = scores.shape[0]  # H, or the H/N heads of one rank of a tensor-parallel run
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        grid = fig.add_gridspec(rows, 2 + cols)
        masked = ~torch.isfinite(scores)
        softmax = torch.where(masked, float("nan"), probs.float())  # 0 after softmax, but shown as masked
        for col, (matrix, title) in enumerate(((scores, "scores + mask"), (softmax, "softmax"))):
            ax = fig.add_subplot(grid[:, col])
            _image(ax, _np(matrix[self.head]), f"head {self.head}: {title}")
            _ticks(ax, "y", self.new_tokens(), self.P)
            _ticks(ax, "x", keys)
            ax.set_ylabel("query position (the token that looks)")
            ax.set_xlabel("key position (the token looked at)")
        for h in range(n):
            ax = fig.add_subplot(grid[h // cols, 2 + h % cols])
            ax.imshow(np.ma.masked_invalid(_np(softmax[h])), aspect="auto", interpolation="nearest",
                      cmap=_colormap("viridis"))
            ax.set_title(f"head {h}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        return fig

    # Stages 15 and 18 ----------------------------------------------------
    def residual_stream(self) -> Figure:
        fig = self.figure(14, 10, "Stages 15 and 18: the size of the residual stream, ‖x‖ per token, layer by layer")
        rows, labels = [_np(self.get(*EMBEDDINGS).values.norm(dim=-1))], ["embedding"]
        for layer in range(self.config.n_layers):
            rows.append(_np(self.get(*STREAM_AFTER_ATTENTION, layer=layer).values.norm(dim=-1)))
            labels.append(f"{layer} + attention")
            rows.append(_np(self.get(*BLOCK_OUTPUT, layer=layer).values.norm(dim=-1)))
            labels.append(f"{layer} + FFN")
        ax = fig.add_subplot()
        matrix = np.stack(rows)
        _image(ax, matrix, "‖x‖ (log colour scale)", norm=LogNorm(), center=False)
        _ticks(ax, "y", labels, numbered=False)
        _ticks(ax, "x", self.new_tokens(), self.P)
        ax.set_ylabel("layer")
        return fig

    # Stage 17 ------------------------------------------------------------
    def ffn(self) -> Figure:
        fig = self.figure(16, 10, "Stage 17: SwiGLU, gate = silu(h · w1ᵀ), up = h · w3ᵀ, and their product")
        for row, name in enumerate(("gate", "up", "gate * up")):
            ax = fig.add_subplot(3, 1, row + 1)
            _image(ax, _np(self.get(17, name).values), f"{name} (T, F)")
            _ticks(ax, "y", self.new_tokens(), self.P)
        ax.set_xlabel("hidden dimension (F)")
        return fig

    # Stage 19 ------------------------------------------------------------
    def next_token(self, k: int = 20) -> Figure:
        probs = self.get(*NEXT_TOKEN_PROBS).values
        chosen = int(self.get(*NEXT_TOKEN).values)
        top = torch.topk(probs, k)
        ids = [i for i, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0]  # after top-k / top-p
        if chosen not in ids:
            ids[-1:] = [chosen]
        values = probs[ids].numpy()
        fig = self.figure(12, 7, f"Stage 19: the next-token distribution (the {len(ids)} most likely), "
                                 f"the chosen token in red")
        ax = fig.add_subplot()
        labels = [f"{_token_label(self.trace.piece(i))} ({i})" for i in ids]
        ax.barh(range(len(ids)), values, color=["#c62828" if i == chosen else "#1e88e5" for i in ids])
        ax.set_yticks(range(len(ids)), labels, fontsize=8)
        ax.get_yticklabels()[ids.index(chosen)].set(color="#c62828", fontweight="bold")
        ax.invert_yaxis()
        if values.min() < values.max() / 100:  # a sampled token can be far less likely than the best
            ax.set_xscale("log")
            ax.set_xlim(left=values.min() / 10)  # so that the least likely bar is still a decade long
            ax.set_xlabel("probability (log scale)")
        else:
            ax.set_xlabel("probability")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}" + ("  ◀ chosen" if ids[y] == chosen else ""), va="center", fontsize=7,
                    color="#c62828" if ids[y] == chosen else "black")
        return fig

    # Every other stage ---------------------------------------------------
    def main_tensor(self, number: int) -> Figure:
        stage = self.trace.stage(number)
        record = self.get(number, stage.main)
        matrix, rows, cols, what = as_matrix(record, self.head, self.config.n_rep)
        fig = self.figure(14, 7, f"Stage {number}: {stage.title}")
        ax = fig.add_subplot()
        if matrix.is_complex():
            matrix = matrix.abs()
        _image(ax, _np(matrix), f"{record.name} {what}")
        if rows == "T":
            _ticks(ax, "y", self.new_tokens(), self.P)
        ax.set_ylabel(rows)
        ax.set_xlabel(cols)
        return fig


def stage_figure(trace: Trace, stage: int, step: int, layer: int, head: int) -> Figure:
    """The figure for `stage`; `trace` must have kept what capture_for_plot asks for."""
    f = Figures(trace, step, layer, head)
    special = {4: f.embeddings, 10: f.rotary, 11: f.kv_cache, 12: f.kv_cache, 13: f.scores,
               15: f.residual_stream, 17: f.ffn, 18: f.residual_stream, 19: f.next_token}
    # A figure drawn on tensors that the implementation that ran does not have gives way to the main tensor's.
    shown = {t.name for t in trace.stage(stage).tensors}
    if stage in special and FIGURE_NEEDS.get(stage, set()) <= shown:
        return special[stage]()
    return f.main_tensor(stage)


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a token the font has no glyph for shows as a box, without a warning per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buffer, format=fmt, dpi=DPI)
    return buffer.getvalue()

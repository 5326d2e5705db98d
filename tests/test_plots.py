"""Matplotlib figures and the terminal heatmap, from real runs of the embedded model."""
import io

import matplotlib.colors
import matplotlib.image
from matplotlib.backends.backend_agg import FigureCanvasAgg
import numpy as np
import pytest
import torch
from rich.console import Console

from stages import STAGES, Sampling
from trace import Capture, traced_run
from trace.heatmap import MAX_COLS, terminal_heatmap
from trace.plots import DPI, MAX_TICKS, figure_bytes, stage_figure
from trace.tables import stage_detail

from .test_cli import QUESTION, cli


@pytest.fixture(scope="module")
def france(embedded_model):
    return traced_run(embedded_model, QUESTION, max_new_tokens=4, capture=Capture.everything())


def png_of(fig) -> tuple[np.ndarray, tuple[int, int]]:
    expected = (round(fig.get_size_inches()[1] * DPI), round(fig.get_size_inches()[0] * DPI))
    return matplotlib.image.imread(io.BytesIO(figure_bytes(fig))), expected


@pytest.mark.parametrize("step", [0, 2])
@pytest.mark.parametrize("number", [s.number for s in STAGES])
def test_every_stage_has_a_figure_of_the_expected_size_that_is_not_blank(france, number, step):
    image, expected = png_of(stage_figure(france, number, step, layer=1, head=4))
    assert image.shape[:2] == expected
    assert image[..., :3].std() > 0.05  # more than an empty canvas
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50  # colour, not just text


def test_scores_figure_shows_the_recorded_softmax_of_the_chosen_head(france):
    fig = stage_figure(france, 13, step=0, layer=2, head=4)
    probs = next(r for r in france.records if r.stage == 13 and r.name == "scores (softmax)"
                 and r.step == 0 and r.layer == 2).values
    shown = fig.axes[2].images[0].get_array()  # the large softmax panel (after one colour bar)
    future = np.triu(np.ones((37, 37), dtype=bool), 1)
    np.testing.assert_array_equal(np.asarray(shown)[~future], probs[4].numpy()[~future])
    for panel in (0, 2):  # -inf of the causal mask: grey in the scores and, as the title says, after softmax too
        masked = np.ma.getmaskarray(fig.axes[panel].images[0].get_array())
        assert (masked == future).all(), panel
    assert fig.axes[0].get_xlabel().startswith("key position") and fig.axes[0].get_ylabel().startswith("query")


def test_the_chosen_token_is_always_visible_even_when_unlikely(embedded_model):
    sampled = traced_run(embedded_model, "Write one word about the sea:", max_new_tokens=3,
                         sampling=Sampling(temperature=1.5, top_p=0.9, seed=1), capture=Capture.everything())
    for step in range(sampled.n_steps):
        chosen = sampled.new_ids[step]
        p = float(sampled.values(19, "probs", step=step)[chosen])
        ax = stage_figure(sampled, 19, step=step, layer=0, head=0).axes[0]
        label = next(t for t in ax.get_yticklabels() if t.get_text().endswith(f"({chosen})"))
        assert label.get_color() == "#c62828"
        bar = next(b for b in ax.patches if b.get_facecolor()[:3] == matplotlib.colors.to_rgb("#c62828"))
        assert bar.get_width() == pytest.approx(p)
        low, high = ax.get_xlim()
        # On the axis as drawn (log when the choice is far less likely), the bar is a real part of it.
        share = (np.log(p / low) / np.log(high / low)) if ax.get_xscale() == "log" else p / high
        assert share > 0.05, (step, p)


def test_gqa_figure_reads_the_sharing_off_the_values(france):
    fig = stage_figure(france, 12, step=1, layer=0, head=0)
    shares = np.asarray(fig.axes[-2].images[0].get_array())
    assert shares.shape == (9, 3)
    assert (shares == np.array([[float(h // 3 == j) for j in range(3)] for h in range(9)])).all()


def test_long_prompts_keep_their_axis_labels_apart(embedded_model):
    prompt = " ".join(f"word{i}" for i in range(150))
    trace = traced_run(embedded_model, prompt, chat=False, max_new_tokens=1)
    fig = stage_figure(trace, 13, step=0, layer=0, head=0)
    ax = fig.axes[0]
    assert len(trace.prompt_ids) > 3 * MAX_TICKS
    assert 0 < len(ax.get_xticklabels()) <= MAX_TICKS and 0 < len(ax.get_yticklabels()) <= MAX_TICKS


def test_cli_plot_writes_a_png(tmp_path):
    out = tmp_path / "ffn.png"
    result = cli("run", QUESTION, "--max-new-tokens", "2", "--stage", "17", "--plot", str(out), "--layer", "4")
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (1000, 1600) and image.std() > 0.05


@pytest.mark.parametrize("args, message", [
    (["--plot", "x.png"], "--plot needs --stage N"),
    (["--stage", "13", "--plot", "x.gif"], "cannot tell the format of x.gif"),
    (["--stage", "13", "--plot", "p.png", "--head", "9"], "query heads 0-8"),
    (["--stage", "13", "--head", "x"], "at least 0"),
])
def test_bad_plot_requests_get_one_line(args, message):
    result = cli("run", "hi", "--max-new-tokens", "2", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr


def test_terminal_heatmap_fits_and_shows_the_values(france):
    console = Console(width=100, file=io.StringIO(), color_system="truecolor", force_terminal=True)
    console.print(stage_detail(france, 17, step=0, layer=0, head=0))
    text = console.file.getvalue()
    blocks = [line for line in text.splitlines() if "▀" in line]
    assert len(blocks) == 12 and all(line.count("▀") == MAX_COLS for line in blocks)
    assert "Heatmap of gate * up" in text and "(37, 1536) shown as (24, 64) block means" in text


def test_terminal_heatmap_keeps_masked_cells_grey_and_exact_extremes():
    matrix = torch.tensor([[0.0, float("-inf")], [-2.0, 3.0]])
    console = Console(width=80, file=io.StringIO(), color_system="truecolor", force_terminal=True)
    console.print(terminal_heatmap(matrix, "m"))
    text = console.file.getvalue()
    assert "38;2;90;90;90" in text  # the grey of the masked cell, as a foreground colour
    assert "-3 " in text and " 3" in text and "grey: -inf (masked)" in text


@pytest.mark.parametrize("number", [13, 17, 10, 15])
def test_tick_labels_never_overlap(embedded_model, number):
    prompt = "Tell me, in detail and with examples, why the sky is blue during the day and red at sunset."
    trace = traced_run(embedded_model, prompt, max_new_tokens=1, capture=Capture.everything())
    fig = stage_figure(trace, number, step=0, layer=0, head=0)
    canvas = FigureCanvasAgg(fig)  # the renderer that draws PNG files
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
            for a, b in zip(boxes, boxes[1:]):
                assert not a.overlaps(b), (number, ax.get_title(), a, b)

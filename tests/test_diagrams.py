"""Graphviz drawings: drawn by the real `dot`, from the registry and a real run."""
import filecmp
import html
import re
import shutil
from pathlib import Path

import subprocess

import matplotlib.image
import pytest
import torch

import stages
from stages import STAGES
from trace import Capture, diagram, traced_run

from .test_cli import ROOT, cli

DIAGRAMS = ROOT / "diagrams"


def svg_texts(path: Path) -> list[str]:
    """The text of every <text> element of an SVG, unescaped."""
    return [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text())]


def test_committed_drawings_are_what_the_command_draws(tmp_path):
    result = cli("diagram", "--all", str(tmp_path))
    assert result.returncode == 0, result.stderr
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == sorted(p.name for p in DIAGRAMS.iterdir() if p.suffix in (".dot", ".svg"))
    assert len(drawn) == 2 * 20  # the complete model and 19 stages, as .dot and .svg
    for name in drawn:
        if name.endswith(".dot"):
            assert filecmp.cmp(tmp_path / name, DIAGRAMS / name, shallow=False), \
                f"diagrams/{name} is out of date: python -m trace diagram --all diagrams --force"
        else:
            assert svg_texts(tmp_path / name) == svg_texts(DIAGRAMS / name), name


def test_a_stage_drawing_carries_the_runs_names_dtypes_and_shapes(tmp_path):
    out = tmp_path / "rotary.svg"
    result = cli("run", "What is the capital of France?", "--max-new-tokens", "2", "--stage", "10",
                 "--layer", "3", "--diagram", str(out))
    assert result.returncode == 0, result.stderr
    texts = svg_texts(out)
    for expected in ["Tensor: xq (rotated)", "(T, H, Dh)", "(37, 9, 64)", "Tensor: xk (rotated)", "(37, 3, 64)",
                     "Tensor: freqs_cis", "complex64", "(37, 32)", "float32", "You are here",
                     "Transformer Block (Layer 3)", "Multi-Head Self-Attention Module", "× freqs_cis, back to real"]:
        assert expected in texts, expected


def test_a_decode_step_drawing_has_no_mask_and_all_cached_positions(tmp_path):
    out = tmp_path / "scores.svg"
    result = cli("run", "What is the capital of France?", "--max-new-tokens", "4", "--stage", "13", "--step", "3",
                 "--diagram", str(out))
    assert result.returncode == 0, result.stderr
    texts = svg_texts(out)
    assert "(9, 1, 40)" in texts and "Tensor: scores (softmax)" in texts
    assert "Tensor: mask" not in texts


def test_png_drawing_opens_and_is_not_blank(tmp_path):
    out = tmp_path / "model.png"
    result = cli("diagram", "-o", str(out))
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > 600 and height > 1500  # the 19 stages, one above the other
    assert image.std() > 0.05


def test_symbolic_drawing_needs_no_model(tmp_path):
    out = tmp_path / "ffn.svg"
    result = cli("diagram", "--symbolic", "--stage", "17", "-o", str(out), LLAMA_TRACE_CACHE=str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    texts = svg_texts(out)
    assert "(T, F)" in texts and "Tensor: gate * up" in texts and "float32" not in texts
    assert not (tmp_path / "none").exists()  # no model was fetched


def test_an_existing_file_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "mine.svg"
    out.write_text("my own drawing")
    result = cli("diagram", "--symbolic", "-o", str(out))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {out} exists already (add --force to overwrite it)"
    assert out.read_text() == "my own drawing"
    assert cli("diagram", "--symbolic", "-o", str(out), "--force").returncode == 0
    assert "<svg" in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.svg"]  # no partial files left


@pytest.mark.parametrize("args, message", [
    (["diagram", "--symbolic"], "say where to draw"),
    (["diagram", "--symbolic", "-o", "drawing.jpg"], "cannot tell the format of drawing.jpg"),
    (["diagram", "--symbolic", "-o", "/no/such/folder/d.svg"], "folder /no/such/folder does not exist"),
    (["diagram", "--symbolic", "-o", "/proc/d.svg"], "cannot write /proc/d.svg"),
    (["diagram", "--symbolic", "--all", "/no/such/folder"], "--all needs an existing folder"),
    (["diagram", "--symbolic", "--stage", "20", "-o", "x.svg"], "stage number from 1 to 19"),
])
def test_bad_diagram_requests_get_one_line(args, message):
    result = cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr


def test_missing_dot_is_said_clearly(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH without graphviz's dot (python is called by its full path)
    bin_dir.mkdir()
    assert shutil.which("dot", path=str(bin_dir)) is None
    result = cli("diagram", "--symbolic", "-o", str(tmp_path / "d.svg"), PATH=str(bin_dir))
    assert result.returncode == 1
    assert result.stderr.strip() == \
        "error: graphviz's 'dot' program is not installed (Debian/Ubuntu: apt-get install graphviz)"


# --- the data flow drawn is the data flow computed -------------------------------------------------

@pytest.fixture(scope="module")
def france(embedded_model):
    return traced_run(embedded_model, "What is the capital of France?", max_new_tokens=2, capture=Capture.everything())


def arrows(graph) -> list[tuple[str, str, str]]:
    """(from, to, attributes) of every visible arrow in a drawing's source (drawn backwards, see diagram._up)."""
    found = re.findall(r"^\s*(\w+) -> (\w+) \[([^\]]*)\]", graph.source, re.M)
    assert all("dir=back" in attrs for _, _, attrs in found)
    return [(tail, head, attrs) for head, tail, attrs in found if "invis" not in attrs]


def tensor_named(stage: int, node: str) -> str:
    return next(t.name for t in STAGES[stage - 1].tensors if diagram._node_id(t.name) == node)


def same_values(trace, maker: int, reader: int, reader_name: str) -> bool:
    """Whether stage `reader`'s input `reader_name` holds exactly the values of a tensor that stage
    `maker` recorded, in the block that hands it on (block 0 -> 1 where the loop goes back)."""
    last = trace.config.n_layers - 1
    scope = {n: stages.stage(n).scope for n in (maker, reader)}
    maker_layer, reader_layer = (0, 1) if maker > reader else \
        (0, 0) if scope[maker] != "layer" else (last, 0) if scope[reader] != "layer" else (1, 1)
    read = trace.values(reader, reader_name, step=0, layer=reader_layer)
    return any(torch.equal(trace.values(maker, t.name, step=0, layer=maker_layer), read)
               for t in STAGES[maker - 1].tensors if t.role in ("in", "out"))


@pytest.mark.parametrize("number", range(2, 20))
def test_every_arrow_into_or_out_of_a_stage_comes_from_where_the_run_computed_that_tensor(france, number):
    """Checked against the recorded values, not the registry: a tensor drawn as coming from stage k
    holds exactly the numbers stage k made; one drawn as going to stage m is exactly what m reads."""
    drawn = arrows(diagram.drawing(number, france, step=0, layer=1))
    outside = [(a, b) for a, b, _ in drawn if a.startswith("from") or b.startswith("to")]
    assert outside, "no arrow from or to another stage"
    for a, b in outside:
        if a.startswith("from"):
            assert same_values(france, int(a[4:]), number, tensor_named(number, b)), (a, b)
        else:
            reader = int(b[2:])
            read = [t.name for t in STAGES[reader - 1].tensors if t.role == "in" and
                    same_values(france, number, reader, t.name) and tensor_named(number, a) in (t.name, t.view_of)]
            assert read, (a, b)


def test_the_residual_stream_is_drawn_in_red_past_attention_and_the_ffn():
    red = diagram.RESIDUAL["color"]
    model = {(a, b) for a, b, attrs in arrows(diagram.drawing(None, None)) if red in attrs}
    assert model == {("s5", "s15"), ("s15", "s18"), ("s18", "s5")}
    for number, skips in ((5, {("t_x", "to15")}), (15, {("from5", "t_x"), ("t_h", "to18")}),
                          (18, {("from15", "t_h")})):
        assert {(a, b) for a, b, attrs in arrows(diagram.drawing(number, None)) if red in attrs} == skips, number


@pytest.mark.parametrize("number", [8, 9, 10, 11, 12, 13])
def test_queries_keys_and_values_are_drawn_in_that_order_left_to_right(number):
    """Where graphviz puts the boxes (its own layout, read back): xq left of xk left of xv, on every row."""
    layout = subprocess.run(["dot", "-Tplain"], input=diagram.drawing(number, None).source, capture_output=True,
                            text=True, check=True).stdout
    rows = {}
    for line in layout.splitlines():
        kind, node, x, y = (line.split() + [""] * 4)[:4]
        order = next((i for i, part in enumerate(("xq", ("xk", "keys", "cache_k"), ("xv", "values", "cache_v")))
                      if any(p in node for p in ((part,) if isinstance(part, str) else part))), None)
        if kind == "node" and node.startswith("t_") and order is not None:
            rows.setdefault(y, []).append((float(x), order))
    assert rows
    for y, boxes in rows.items():
        assert [order for _, order in sorted(boxes)] == sorted(order for _, order in boxes), (number, y)


def test_the_complete_model_can_light_up_one_stage(tmp_path):
    lit = diagram.render(diagram.drawing(None, None, here=13), "svg").decode()
    plain = diagram.render(diagram.drawing(None, None), "svg").decode()
    assert (plain.count(diagram.OP_FILL), lit.count(diagram.OP_FILL)) == (19 + 1, 1 + 1)  # stage titles + legend
    with pytest.raises(stages.UserError, match="no stage 20"):
        diagram.drawing(None, None, here=20)

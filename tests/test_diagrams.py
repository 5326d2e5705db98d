"""Graphviz drawings: drawn by the real `dot`, from the registry and a real run."""
import filecmp
import html
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest

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

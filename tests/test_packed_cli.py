"""--impl packed as a user meets it: the run, the saved trace, the diff against the plain run, the
packing table and drawing, the figures; and the one-line refusals."""
import json

import pytest

from stages.pipelines import PACKED, PLAIN
from trace import Capture, traced_run
from trace.compare import diff_table
from trace.plots import stage_figure
from trace.tracefile import load_trace, save_trace

from .test_cli import QUESTION, cli, lines_fit, render


@pytest.fixture(scope="module")
def both(embedded_model):
    """(plain, packed) traces of the same run, everything kept."""
    return tuple(traced_run(embedded_model, QUESTION, max_new_tokens=3, capture=Capture.everything(), pipeline=p)
                 for p in (PLAIN, PACKED))


def test_the_diff_shows_the_two_equal_and_what_only_one_has(both):
    text = render(diff_table(*both, step=1, layer=4, stage=None, names=("plain", "packed")))
    assert "same tokens" in text and "--impl packed" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 6 and cells[1].isdigit():
            rows[(int(cells[1]), cells[2])] = cells[6]
    assert rows[(8, "qkv_proj")] == "only in B" and rows[(8, "wq")] == "only in A"
    assert rows[(17, "gate_up")] == "only in B" and rows[(17, "gate")] == "only in A"
    assert rows[(10, "freqs_cis")] == "only in A" and rows[(10, "cos")] == "only in B"
    assert rows[(8, "xq")].endswith("↺") and rows[(11, "cache_k")].endswith("↺")  # compared in one layout
    for key in [(13, "scores (softmax)"), (14, "attention output"), (18, "out"), (19, "logits")]:
        assert float(rows[key].rstrip(" ↺")) < 1e-3, key


def test_a_packed_trace_file_keeps_its_implementation(both, tmp_path):
    loaded = load_trace(save_trace(both[1], tmp_path / "packed.trace", force=False))
    assert loaded.pipeline == "packed"
    assert [(r.stage, r.name) for r in loaded.select(0, 0)] == [(r.stage, r.name) for r in both[1].select(0, 0)]


@pytest.mark.parametrize("stage", [8, 10, 17])
def test_figures_of_the_packed_stages(both, stage):
    figure = stage_figure(both[1], stage, step=0, layer=0, head=0)
    assert figure.axes  # a stage whose special figure needs plain-only tensors shows its main tensor


def test_run_show_and_diagram_from_the_command_line(tmp_path):
    saved = tmp_path / "packed.trace"
    run = cli("run", QUESTION, "--impl", "packed", "--stage", "8", "--max-new-tokens", "2", "--save", str(saved))
    assert run.returncode == 0, run.stderr
    assert "implementation: a serving engine's layers" in run.stdout
    assert "qkv_proj" in run.stdout and "How the packed weights are made" in run.stdout
    assert "model.layers.N.self_attn.q_proj.weight" in run.stdout and lines_fit(run.stdout)
    shown = cli("show", str(saved), "--stage", "17", "--json")
    stage17 = json.loads(shown.stdout)["stages"][0]
    assert [t["name"] for t in stage17["tensors"]] == ["normalized h", "gate_up_proj", "gate_up", "gate * up",
                                                       "w2", "ffn output"]
    drawing = cli("diagram", "--impl", "packed", "--packing", "--symbolic", "-o", str(tmp_path / "packing.svg"))
    assert drawing.returncode == 0, drawing.stderr
    svg = (tmp_path / "packing.svg").read_text()
    assert "qkv_proj" in svg and "gate_up_proj" in svg and "blk.N.attn_q.weight" in svg


def test_packing_of_the_plain_implementation_is_refused_in_one_line(tmp_path):
    result = cli("diagram", "--packing", "--symbolic", "-o", str(tmp_path / "p.svg"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--impl plain packs none" in result.stderr and not (tmp_path / "p.svg").exists()


def test_stages_lists_the_packed_registry():
    result = cli("stages", "--impl", "packed", "--json")
    stages = json.loads(result.stdout)
    assert [t["name"] for t in stages[7]["tensors"]][:3] == ["normalized x", "qkv_proj", "qkv"]
    assert stages[7]["tensors"][1]["symbolic_shape"] == "((H+2·Hkv)·Dh, D)"

"""The walkthrough notebooks run top to bottom with a real Jupyter kernel, and the committed
copies hold the outputs the current code produces.

"The same output" means: the same text, the same integers, and floating-point numbers equal
within a tolerance that fits printed floats (their last digit moves between CPUs, thread counts
and vector widths); pictures nearly pixel-equal. Each notebook runs twice: once as this machine
sums floats, once in another summation order (AVX2 kernels, one thread, MKL's compatible
path), so that a check that holds on one CPU only fails here, not on a contributor's machine.
"""
import base64
import importlib.util
import io
import math
import os
import re
from pathlib import Path

import matplotlib.image
import nbformat
import numpy as np
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("execute_notebooks", NOTEBOOKS / "execute.py")
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)

FLOAT_ORDERS = {
    "this-machine": {},
    "another-float-order": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"},
}
# Printed floats agree to 2 % or to 1e-3: enough to tell a stale output from rounding, and
# differences from the reference (rounding noise by nature, ~1e-5) count as equal below 1e-3.
REL_TOL, ABS_TOL = 2e-2, 1e-3

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def sanitise(text: str) -> str:
    text = _ANSI.sub("", text)  # colours
    text = re.sub(r"0x[0-9a-f]{6,}", "0x…", text)  # object addresses
    text = re.sub(r"[ \t]+\n", "\n", text)  # rich wraps a line a digit longer one word earlier
    return re.sub(r"\d+\.\d+(?:</span>)? ?s\b", "… s", text)  # timings (in HTML, a number ends in </span>)


def numbers_and_text(text: str) -> tuple[list[str], str]:
    """The numbers in `text`, and the text around them with each number as '#'. Runs of one
    character collapse into one, so that a table whose column widened by a digit reads the same."""
    text = sanitise(text)
    return _NUMBER.findall(text), re.sub(r"(.)\1+", r"\1", _NUMBER.sub("#", text))


def same_number(a: str, b: str) -> bool:
    if re.fullmatch(r"[-+]?\d+", a) and re.fullmatch(r"[-+]?\d+", b):
        return int(a) == int(b)
    return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)


def same_text(a: str, b: str) -> bool:
    (numbers_a, words_a), (numbers_b, words_b) = numbers_and_text(a), numbers_and_text(b)
    return words_a == words_b and len(numbers_a) == len(numbers_b) and \
        all(map(same_number, numbers_a, numbers_b))


def outputs(cell) -> list[tuple[str, dict]]:
    return [(o.output_type, {k: v for k, v in (o.get("data") or {"text": o.get("text", "")}).items()})
            for o in cell.get("outputs", [])]


def png(data: str) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(data)))


def test_there_are_nine_walkthroughs():
    assert [p.name[:2] for p in execute_notebooks.notebooks()] == ["01", "02", "03", "04", "05", "06", "07", "08", "09"]


@pytest.mark.parametrize("path", execute_notebooks.notebooks(), ids=lambda p: p.stem)
def test_saved_outputs_show_things_not_their_python_names(path):
    """A table or figure left unprinted shows as `<rich.console.Group at 0x...>`: never in a saved notebook."""
    for number, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for _, data in outputs(cell):
            if set(data) <= {"text/plain", "text"}:  # nothing richer (a picture, HTML) shown instead
                text = str(data.get("text/plain", data.get("text", "")))
                assert not re.search(r"<[\w.]+ (object )?at 0x[0-9a-f]+>", text), (path.name, number)


def test_timings_are_not_compared():
    html = '<span style="color: #008080">0.050</span> s (1 position)'
    assert same_text(html, html.replace("0.050", "0.250")) and same_text("took 1.5 s", "took 2.0 s")
    assert not same_text("1 position", "2 position")


def test_printed_floats_compare_within_rounding_and_text_exactly():
    assert same_text("max -2.2266 at 3.72e-05", "max -2.2265 at 3.71e-05")
    assert same_text("= 0.00085 on values, a relative difference of\n1.9e-07",
                     "= 0.0011 on values, a relative difference of \n2.5e-07")  # wrapped a word earlier
    assert same_text("│ 0.0000 │", "│ -0.0000  │")  # a column one character wider
    assert same_text("diff 1.02e-04", "diff 1.17e-04")  # noise below the bound
    assert not same_text("max 1.90", "max 2.26")
    assert not same_text("37 ids", "36 ids")
    assert not same_text("Paris", "Lyon")
    assert not same_text("1.5 2.5", "1.5")


@pytest.mark.parametrize("order", FLOAT_ORDERS)
@pytest.mark.parametrize("path", execute_notebooks.notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_and_its_committed_outputs_are_current(path, order, embedded_path):
    committed = nbformat.read(path, as_version=4)
    fresh = execute_notebooks.execute(path, env={**os.environ, **FLOAT_ORDERS[order]})  # raises on any error
    assert len(fresh.cells) == len(committed.cells)
    for number, (new, old) in enumerate(zip(fresh.cells, committed.cells, strict=True)):
        assert new.source == old.source
        new_out, old_out = outputs(new), outputs(old)
        where = f"{path.name}, cell {number}: outputs are stale (run python notebooks/execute.py)"
        kinds = [[(kind, sorted(data)) for kind, data in out] for out in (new_out, old_out)]
        assert kinds[0] == kinds[1], where
        for (_, a), (_, b) in zip(new_out, old_out, strict=True):
            for mime in a:
                if mime == "image/png":
                    image_a, image_b = png(a[mime]), png(b[mime])
                    assert image_a.shape == image_b.shape and np.abs(image_a - image_b).mean() < 0.01, where
                else:
                    assert same_text(str(a[mime]), str(b[mime])), f"{where}\n{a[mime]}\n---\n{b[mime]}"
    if path.name.startswith("01"):  # pictures are in the saved notebook, to read on a code-hosting site
        assert any("image/png" in data for cell in committed.cells for _, data in outputs(cell))
        assert any("image/svg+xml" in data for cell in committed.cells for _, data in outputs(cell))

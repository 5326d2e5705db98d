"""The walkthrough notebooks run top to bottom with a real Jupyter kernel, and the committed
copies hold exactly the outputs the current code produces (after sanitising addresses)."""
import base64
import importlib.util
import io
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


def sanitise(text: str) -> str:
    text = re.sub(r"0x[0-9a-f]{6,}", "0x…", text)  # object addresses
    return re.sub(r"\d+\.\d+ ?s\b", "… s", text)  # timings


def outputs(cell) -> list[tuple[str, dict]]:
    return [(o.output_type, {k: v for k, v in (o.get("data") or {"text": o.get("text", "")}).items()})
            for o in cell.get("outputs", [])]


def png(data: str) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(data)))


def test_there_are_five_walkthroughs():
    assert [p.name[:2] for p in execute_notebooks.notebooks()] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", execute_notebooks.notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_and_its_committed_outputs_are_current(path, embedded_path):
    committed = nbformat.read(path, as_version=4)
    fresh = execute_notebooks.execute(path)  # raises on any error, failed check included
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
                    assert sanitise(str(a[mime])) == sanitise(str(b[mime])), where
    if path.name.startswith("01"):  # pictures are in the saved notebook, to read on a code-hosting site
        assert any("image/png" in data for cell in committed.cells for _, data in outputs(cell))
        assert any("image/svg+xml" in data for cell in committed.cells for _, data in outputs(cell))

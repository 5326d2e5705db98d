"""Runs every walkthrough notebook top to bottom with a real Jupyter kernel and saves it with its outputs.

    python notebooks/execute.py            all of them, in place
    python notebooks/execute.py 02-...     some of them

The committed notebooks must be what this produces: tests/test_notebooks.py runs them again and compares.
"""
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900  # per cell


def execute(path: Path, env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """The notebook at `path`, executed in its own folder (as Jupyter would) by a kernel with
    environment `env` (default: this process's), MKL_DYNAMIC off; raises on any error."""
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        cell.metadata.pop("execution", None)  # timestamps of an earlier run
    client = NotebookClient(book, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})  # no timestamps: re-runs give no diff
    # MKL may change its thread count with the machine's load (MKL_DYNAMIC), and with it, once in a while,
    # transformers' results (notebook 5's reference; measured under load: 3 runs in ~30 off by 3e-4, 0 in 12 with it off).
    env = {**(os.environ if env is None else env), "MKL_DYNAMIC": "FALSE"}
    client.execute(env=env)
    return book


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]-*.ipynb"))


def main(names: list[str]) -> int:
    for path in [HERE / n for n in names] or notebooks():
        print(f"executing {path.name} ...", flush=True)
        nbformat.write(execute(path), path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The embedded model, parsed once.

Reading the embedded GGUF costs seconds each time: the `gguf` reader walks 49,152 tokenizer
strings, and every weight is dequantized from Q4_1. The first run keeps what that produces
beside the file, in `<file>.parsed/`: the metadata as JSON and the dequantized float32 weights
as memory-mapped safetensors. Later runs read those instead: the same numbers, in a fraction of
the time, and pages of the weights shared with the page cache instead of copied.

The folder names the file it was made from (size, modification time, inode, checksum): a
rewritten or replaced GGUF is parsed anew. A cache that cannot be written (a read-only or full
disk) only costs the time.
"""
import json
import os
import shutil
import tempfile
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import Checkpoint, Progress
from .gguf_model import _source, checkpoint_from_fields, config_from_fields, load_weights, open_gguf, read_fields
from .weights import LayerWeights, Weights

FORMAT = 1  # raised whenever what the folder holds changes
LAYER_NAMES = [f.name for f in dataclass_fields(LayerWeights)]


def _flat(weights: Weights) -> dict[str, torch.Tensor]:
    flat = {"tok_embeddings": weights.tok_embeddings, "norm": weights.norm}
    if weights.output is not weights.tok_embeddings:
        flat["output"] = weights.output
    if weights.rope_freqs is not None:
        flat["rope_freqs"] = weights.rope_freqs
    for i, layer in enumerate(weights.layers):
        flat.update({f"layers.{i}.{name}": getattr(layer, name) for name in LAYER_NAMES})
    return flat


def _unflat(flat: dict[str, torch.Tensor], n_layers: int, dtype: torch.dtype) -> Weights:
    def take(name: str) -> torch.Tensor:
        return flat[name] if flat[name].dtype == dtype else flat[name].to(dtype)

    tok_embeddings = take("tok_embeddings")
    return Weights(tok_embeddings=tok_embeddings,
                   layers=[LayerWeights(**{name: take(f"layers.{i}.{name}") for name in LAYER_NAMES})
                           for i in range(n_layers)],
                   norm=take("norm"), output=take("output") if "output" in flat else tok_embeddings,
                   rope_freqs=flat.get("rope_freqs"))  # float32 always, as the GGUF reader gives it


def _read(folder: Path, made_from: str, path: Path, dtype: torch.dtype, shapes_only: bool) -> Checkpoint | None:
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("made_from") != made_from:
            return None
        config = config_from_fields(meta["fields"])
        weights = None if shapes_only else _unflat(load_file(folder / "weights.safetensors"), config.n_layers, dtype)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # absent or damaged: parse the GGUF
        return None
    return checkpoint_from_fields(path, meta["fields"], weights, meta["source"], meta["tied"])


def _write(folder: Path, made_from: str, fields: dict, weights: Weights, source: str, tied: bool) -> None:
    made = []  # folders of ours to remove at the end, whatever happens
    try:
        made.append(tmp := Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".partial.")))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder beside it is not
        save_file(_flat(weights), tmp / "weights.safetensors")
        meta = {"format": FORMAT, "made_from": made_from, "fields": fields, "source": source, "tied": tied}
        (tmp / "model.json").write_text(json.dumps(meta), encoding="utf-8")
        if folder.is_dir():  # stale (made from another file, or of another format): moved aside first
            made.append(trash := Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".stale.")))
            os.replace(folder, trash / "old")
        os.replace(tmp, folder)  # atomic: a reader sees no folder or the whole new one
    except (OSError, TypeError, ValueError):  # a read-only or full disk, a race lost: nothing lost but time
        pass
    finally:
        for tree in made:
            shutil.rmtree(tree, ignore_errors=True)


def read_parsed_once(path: Path, made_from: str, dtype: torch.dtype = torch.float32, progress: Progress = None,
                     shapes_only: bool = False) -> Checkpoint:
    """The GGUF file at `path` (whose identity is `made_from`), from its parsed copy when there is one."""
    folder = path.with_name(path.name + ".parsed")
    cached = _read(folder, made_from, path, dtype, shapes_only)
    if cached is not None:
        return cached
    reader = open_gguf(path)
    fields = read_fields(reader)
    weights = load_weights(reader, config_from_fields(fields), torch.float32, progress)
    source, tied = _source(reader), "output.weight" not in {t.name for t in reader.tensors}
    _write(folder, made_from, fields, weights, source, tied)
    config = config_from_fields(fields)
    return checkpoint_from_fields(path, fields, None if shapes_only else _unflat(_flat(weights), config.n_layers, dtype),
                                  source, tied)

"""The embedded model, parsed once.

Reading the embedded GGUF costs seconds each time: the `gguf` reader walks 49,152 tokenizer
strings, and every weight is dequantized from Q4_1. The first run keeps what that produces
beside the file, in `<file>.parsed/`: the metadata as JSON and the dequantized float32 weights
as memory-mapped safetensors. Later runs read those instead: the same numbers, in a fraction of
the time, and pages of the weights shared with the page cache instead of copied.

The folder names the file it was made from (size, modification time, inode, checksum): a
rewritten or replaced GGUF is parsed anew, and so is a copy damaged in any way. A cache that
cannot be written (a read-only or full disk) only costs the time; a file or folder of that name
that this module did not make is left alone.
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import Checkpoint, Progress
from .errors import UserError
from .gguf_model import (checkpoint_from_fields, config_from_fields, load_weights, open_gguf, read_fields, read_gguf,
                         source_and_tied)
from .weights import LayerWeights, Weights, is_tall, shapes_only_weights

FORMAT = 3  # raised whenever what the folder holds changes (3: tall weights stored transposed)
STALE_PARTIAL_S = 3600  # a half-written folder older than this was left by a writer that was killed
LAYER_NAMES = [f.name for f in dataclass_fields(LayerWeights)]


def _flat(weights: Weights) -> dict[str, torch.Tensor]:
    flat = {"tok_embeddings": weights.tok_embeddings, "norm": weights.norm}
    if not weights.tied:
        flat["output"] = weights.output
    if weights.rope_freqs is not None:
        flat["rope_freqs"] = weights.rope_freqs
    for i, layer in enumerate(weights.layers):
        flat.update({f"layers.{i}.{name}": getattr(layer, name) for name in LAYER_NAMES})
    return flat


def _stored(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as the file holds them: a tall weight (see stages.weights.for_decoding) as its
    transpose, in memory order, so that the weight read back from it is already laid out for decoding."""
    return {name: t.t().contiguous() if is_tall(t) else t for name, t in flat.items()}


def _unflat(flat: dict[str, torch.Tensor], n_layers: int) -> Weights:
    tok_embeddings = flat["tok_embeddings"]
    return Weights(tok_embeddings=tok_embeddings,
                   layers=[LayerWeights(**{name: flat[f"layers.{i}.{name}"] for name in LAYER_NAMES})
                           for i in range(n_layers)],
                   norm=flat["norm"], output=flat.get("output", tok_embeddings), rope_freqs=flat.get("rope_freqs"))


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read(folder: Path, made_from: str, path: Path, dtype: torch.dtype, shapes_only: bool) -> Checkpoint | None:
    """The checkpoint the folder holds, or None where it is absent, stale or damaged in any way."""
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("made_from") == made_from
                and isinstance(meta.get("fields"), dict) and isinstance(meta.get("source"), str)
                and isinstance(meta.get("tied"), bool)
                and meta.get("weights") == _identity(folder / "weights.safetensors")):
            return None
        weights = None
        if not shapes_only:
            config = config_from_fields(meta["fields"])
            stored = load_file(folder / "weights.safetensors")
            expected = _flat(shapes_only_weights(config, torch.float32, meta["tied"]))
            if any(name not in stored or stored[name].shape != s.shape for name, s in _stored(expected).items()):
                return None
            tall = {name for name, t in expected.items() if is_tall(t)}
            flat = {name: t.t() if name in tall else t for name, t in stored.items()}  # (rope_freqs too)
            weights = _unflat(flat, config.n_layers).to(torch.device("cpu"), dtype)
        return checkpoint_from_fields(path, meta["fields"], lambda config: weights, meta["source"], meta["tied"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, UserError):
        return None  # absent or damaged: the GGUF file, which is checked, is parsed again


def _ours(folder: Path) -> bool:
    """A folder this module made (holding its model.json), not one of the user's that has the name."""
    return folder.is_dir() and not folder.is_symlink() and (folder / "model.json").is_file()


def _write(path: Path, folder: Path, made_from: str, fields: dict, weights: Weights, source: str, tied: bool) -> None:
    if folder.exists() and not _ours(folder) or folder.is_symlink():
        return  # somebody else's file or folder: left alone, and the GGUF parsed each time
    for partial in folder.parent.glob(folder.name + ".partial.*"):  # of a writer killed midway, long ago
        if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:
            shutil.rmtree(partial, ignore_errors=True)
    made = []  # folders of ours to remove at the end, whatever happens
    try:
        made.append(tmp := Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".partial.")))
        save_file(_stored(_flat(weights)), tmp / "weights.safetensors")
        meta = {"format": FORMAT, "made_from": made_from, "weights": _identity(tmp / "weights.safetensors"),
                "fields": fields, "source": source, "tied": tied}
        (tmp / "model.json").write_text(json.dumps(meta), encoding="utf-8")
        # mkdtemp and safetensors make them private: they get the GGUF file's own permissions (a shared cache)
        readable = path.stat().st_mode & 0o666
        for made_path, mode in ((tmp, readable | (readable & 0o444) >> 2), (tmp / "weights.safetensors", readable),
                                (tmp / "model.json", readable)):
            made_path.chmod(mode)
        if _ours(folder):  # stale (made from another file, or of another format): moved aside first
            made.append(trash := Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".stale.")))
            os.replace(folder, trash / "old")
        os.replace(tmp, folder)  # atomic: a reader sees no folder or the whole new one
    except (OSError, TypeError, ValueError, SafetensorError):  # a read-only or full disk, a race lost
        pass  # nothing lost but time: the next run tries again
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
    if shapes_only:  # no weights wanted: nothing to dequantize, nor to keep
        return read_gguf(path, dtype, progress, shapes_only=True)
    reader = open_gguf(path)
    fields = read_fields(reader)
    config = config_from_fields(fields)
    weights = load_weights(reader, config, torch.float32, progress).to(  # (as the model holds them)
        torch.device("cpu"), torch.float32, decoding=True)
    source, tied = source_and_tied(reader)
    _write(path, folder, made_from, fields, weights, source, tied)
    return checkpoint_from_fields(path, fields, lambda config: weights.to(torch.device("cpu"), dtype), source, tied)

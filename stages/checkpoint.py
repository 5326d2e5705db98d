"""What `--model PATH` points at, recognised from what the path holds, read into one form:
a name, a config, weights under Meta's names with wq/wk rows in the interleaved-pair RoPE layout,
a tokenizer, and a line saying where it all came from.

  a file starting with 'GGUF'              llama.cpp's format (stages.gguf_model)
  a folder with config.json                a Hugging Face model folder (stages.hf_folder)
  a folder with params.json                Meta's original download (stages.meta_folder)
  config.json / params.json alone          the shapes only, no weights (read by the same two)
"""
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .errors import UserError
from .inputs import file_mode, regular_file
from .tokenizer import Tokenizer
from .weights import Weights

Progress = Callable[[int, int], None] | None
CONFIG_FILES = ("config.json", "params.json")
MAX_JSON_BYTES = 1 << 24  # a model's config or tokenizer settings; tokenizer.json is read elsewhere


@dataclass
class Checkpoint:
    name: str
    config: ModelConfig
    weights: Weights | None  # None: a config without weights (shapes only)
    tokenizer: Tokenizer | None
    source: str  # e.g. "Hugging Face safetensors · wq/wk rows came in rotate-half layout, permuted at load"
    tied: bool = False  # the output head is the embedding table (said where weights is None)


def read_json(path: Path, what: str) -> dict:
    """A small JSON object from a model folder, with one clear line for every way it can be wrong."""
    regular_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UserError(f"{path} is too large to be a {what} ({path.stat().st_size} bytes)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object, so not a {what}")
    return value


def kind_of(path: Path) -> str:
    """'gguf', 'hf', 'meta', 'hf-config' or 'meta-config': what the path holds."""
    mode = file_mode(path, "model")
    if stat.S_ISDIR(mode):
        if (path / "config.json").exists():
            return "hf"
        if (path / "params.json").exists():
            return "meta"
        raise UserError(f"{path} is a folder without config.json (Hugging Face) or params.json (Meta): "
                        f"not a model folder")
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is not a regular file (a device, a pipe or a socket), so not a model")
    with open(path, "rb") as f:
        start = f.read(4)
    if start == b"GGUF":
        return "gguf"
    if start[:1] == b"{":
        return "meta-config" if "n_heads" in read_json(path, "model config") else "hf-config"
    raise UserError(f"cannot tell what {path} is: --model takes a GGUF file, a Hugging Face model folder "
                    f"(config.json), a Meta folder (params.json), or a config.json / params.json alone")


def read_checkpoint(path: Path, dtype: torch.dtype = torch.float32, progress: Progress = None,
                    shapes_only: bool = False) -> Checkpoint:
    """The checkpoint at `path`, its weights in `dtype` on the CPU (none with `shapes_only`)."""
    kind = kind_of(path)
    if kind == "gguf":
        from .gguf_model import read_gguf
        return read_gguf(path, dtype, progress, shapes_only)
    if kind in ("hf", "hf-config"):
        from .hf_folder import read_hf
        return read_hf(path, dtype, progress, shapes_only or kind == "hf-config")
    from .meta_folder import read_meta
    return read_meta(path, dtype, progress, shapes_only or kind == "meta-config")

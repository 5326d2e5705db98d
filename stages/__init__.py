"""The LLaMA forward pass as the 19 stages of the "LLaMA Nuts and Bolts" diagrams."""
from pathlib import Path
from typing import Callable

import torch

from .config import TINY, ModelConfig
from .embedded import NAME as EMBEDDED_NAME, embedded_model_path
from .errors import UserError
from .generate import check_length, forward_step, generate
from .gguf_model import read_gguf
from .model import Model, resolve_device
from .output import Sampling
from .registry import NOTATION, STAGES, stage
from .text import tokenize


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path | None = None, device: str = "auto", dtype: str = "float32",
               progress: Callable[[int, int], None] | None = None) -> Model:
    """A GGUF file (the embedded SmolLM2-135M-Instruct when `path` is None), on `device`, its
    weights dequantized to float32 and then cast to `dtype`."""
    torch_device = resolve_device(device)
    name, config, weights, tokenizer = read_gguf(Path(path) if path else embedded_model_path(), progress)
    name = name if path else EMBEDDED_NAME
    return Model.build(name, config, weights, tokenizer, torch_device, DTYPES[dtype])


__all__ = ["DTYPES", "Model", "ModelConfig", "NOTATION", "STAGES", "Sampling", "TINY", "UserError", "check_length", "forward_step",
           "generate", "load_model", "stage", "tokenize"]

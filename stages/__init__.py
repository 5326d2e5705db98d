"""The LLaMA forward pass as the 19 stages of the "LLaMA Nuts and Bolts" diagrams."""
from pathlib import Path
from typing import Callable

import torch

from .config import TINY, ModelConfig
from .embedded import NAME as EMBEDDED_NAME, embedded_identity, embedded_model_path
from .errors import NoWeightsError, UserError
from .forward import forward_step
from .generate import check_length, generate
from .checkpoint import read_checkpoint
from .model import Model, resolve_device
from .output import Sampling
from .pipelines import PIPELINES, PLAIN, Pipeline
from .presets import PRESETS, read_preset
from .registry import NOTATION, STAGES, stage
from .text import tokenize
from .weights import shapes_only_weights


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path | None = None, device: str = "auto", dtype: str = "float32",
               progress: Callable[[int, int], None] | None = None, shapes_only: bool = False) -> Model:
    """The model at `path` (a GGUF file, a Hugging Face or a Meta folder, a config alone, or a
    preset's name; the embedded SmolLM2-135M-Instruct when None) on `device`, its weights read in
    `dtype`. With `shapes_only`, no weights are read: the model lives on torch's meta device,
    where the stages compute every shape and no number."""
    torch_dtype = DTYPES[dtype]
    if path is not None and str(path) in PRESETS:
        checkpoint = read_preset(str(path), shapes_only)
    elif path is None:
        from .parsed_cache import read_parsed_once
        gguf = embedded_model_path()
        checkpoint = read_parsed_once(gguf, embedded_identity(gguf), torch_dtype, progress, shapes_only)
    else:
        checkpoint = read_checkpoint(Path(path), torch_dtype, progress, shapes_only)
    name = checkpoint.name if path else EMBEDDED_NAME
    if shapes_only:
        weights = shapes_only_weights(checkpoint.config, torch_dtype, checkpoint.tied)
        return Model(name, checkpoint.config, weights, checkpoint.tokenizer, checkpoint.source)
    if checkpoint.weights is None:
        raise NoWeightsError(f"{path} holds a model's configuration but no weights: add --shapes-only to see its shapes")
    return Model.build(name, checkpoint.config, checkpoint.weights, checkpoint.tokenizer, resolve_device(device),
                       torch_dtype, checkpoint.source)


__all__ = ["DTYPES", "Model", "ModelConfig", "NOTATION", "NoWeightsError", "PIPELINES", "PLAIN", "Pipeline", "STAGES", "Sampling", "TINY", "UserError", "check_length", "forward_step",
           "generate", "load_model", "stage", "tokenize"]

"""The ways to run the same model, each with the registry of stages it shows.

A `Pipeline` is what the recorder, the budget, the tables, the drawings and the trace files are
given instead of a global registry: its stages (the 19, with the tensors and operations this
implementation has), its forward pass, and the RoPE layout of its queries and keys. The plain
pipeline, Meta's reference code stage by stage, is the default; `packed` is a serving engine's.
"""
from dataclasses import dataclass
from typing import Callable

from . import forward, packed
from .packed_stages import PACKED_STAGES
from .registry import STAGES, Stage, TensorSpec, readers
from .tensor_parallel_stages import TENSOR_PARALLEL_STAGES
from .training_stages import TRAINING_STAGES

N_STAGES = 19


@dataclass(frozen=True)
class Pipeline:
    name: str  # what --impl takes and trace files keep
    title: str
    rope_layout: str  # of its query and key tensors: "interleaved" or "rotate-half" (stages.rope.reorder)
    stages: tuple[Stage, ...]
    # (model, tokens, start_pos, caches, sampling, generator) -> (next id, logits); None: no generation loop
    forward_step: Callable | None
    # config -> the parts of each packed weight (stages.packed.PackedPart), for pipelines that pack weights
    packed_parts: Callable | None = None

    def stage(self, number: int) -> Stage:
        return self.stages[number - 1]

    def readers(self, number: int, name: str) -> tuple[tuple[Stage, TensorSpec], ...]:
        return readers(self.stages, number, name)


PLAIN = Pipeline("plain", "the stages as Meta's reference code runs them", "interleaved", STAGES,
                 forward.forward_step)
PACKED = Pipeline("packed", "a serving engine's layers (vLLM, nano-vllm): packed projections, fused add + norm",
                  "rotate-half", PACKED_STAGES, packed.forward_step, packed.packed_parts)
# One rank of the plain stages split over N processes (stages.tensor_parallel): what --tp N runs.
TENSOR_PARALLEL = Pipeline("tensor-parallel", "Meta's model-parallel layers on torch.distributed",
                           "interleaved", TENSOR_PARALLEL_STAGES,
                           forward.forward_step)
# The plain stages with a batch, the loss, the backward pass and AdamW: what `train` runs (stages.training).
TRAINING = Pipeline("training", "a training step: batched stages, the loss, gradients and AdamW", "interleaved",
                    TRAINING_STAGES, None)
PIPELINES = {p.name: p for p in (PLAIN, PACKED, TENSOR_PARALLEL, TRAINING)}
IMPLEMENTATIONS = (PLAIN.name, PACKED.name)  # what --impl chooses from; --tp N chooses the tensor-parallel one

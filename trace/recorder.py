"""The trace: every tensor each stage shows, recorded while the model runs.

A `Recorder` is the sink that `stages.hooks.recording` installs. For every
record it notes where it was made (step, layer), its stage and name, dtype,
symbolic and concrete shape and summary statistics; it keeps the values
themselves only where the capture selection says so (by default the selected
step and layer, or everything).
"""
from dataclasses import dataclass, field

import torch

from stages.registry import stage as stage_info

STAT_NAMES = ("min", "max", "mean", "std")


@dataclass
class TensorRecord:
    step: int | None  # None: before the generation loop (stages 1 and 2)
    layer: int | None  # None: outside the blocks
    stage: int
    name: str
    role: str
    symbolic: str
    dtype: str
    shape: tuple[int, ...]
    _stats: torch.Tensor | None = field(default=None, repr=False)  # (4) float64, lazily read back
    _values: torch.Tensor | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[str, float] | None:
        if self._stats is None:
            return None
        return dict(zip(STAT_NAMES, self._stats.tolist()))

    @property
    def values(self) -> torch.Tensor | None:
        """The recorded values on the CPU, or None where only statistics were kept."""
        return None if self._values is None else self._values.cpu()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _stats(t: torch.Tensor) -> torch.Tensor | None:
    if t.numel() == 0:
        return None
    real = torch.view_as_real(t) if t.is_complex() else t
    real = real.double() if real.dtype in (torch.int64, torch.int32, torch.bool) else real.float()
    lo, hi = torch.aminmax(real)
    std, mean = torch.std_mean(real, correction=0)
    return torch.stack([lo, hi, mean, std]).double()  # stays on the device until read


@dataclass(frozen=True)
class Capture:
    """Which records keep their values: everything, or one step and one layer
    (plus the records outside the layers of that step, and stages 1 and 2),
    plus some stages at every layer of that step or at every step of that layer."""
    step: int = 0
    layer: int = 0
    everything: bool = False
    across_layers: frozenset[int] = frozenset()  # stages kept at every layer of `step`
    across_steps: frozenset[int] = frozenset()  # stages kept at every step for `layer`

    def keeps(self, stage: int, step: int | None, layer: int | None) -> bool:
        if self.everything or step is None:
            return True
        if stage in self.across_steps and layer in (None, self.layer):
            return True
        return step == self.step and (layer in (None, self.layer) or stage in self.across_layers)


class Recorder:
    def __init__(self, capture: Capture = Capture()):
        self.capture = capture
        self.records: list[TensorRecord] = []
        self.step: int | None = None
        self.layer: int | None = None
        self._weight_stats: dict[tuple, torch.Tensor | None] = {}

    def at(self, **where: int | None) -> None:
        for key, value in where.items():
            setattr(self, key, value)

    def record(self, stage: int, name: str, tensor: torch.Tensor, copy: bool) -> None:
        spec = stage_info(stage).spec(name)  # a name missing from the registry is a bug: fail loudly
        tensor = tensor.detach()
        if spec.role == "weight":
            # Weights do not change between steps: their statistics are computed once.
            key = (tensor.data_ptr(), tensor.shape, tensor.device)
            if key not in self._weight_stats:
                self._weight_stats[key] = _stats(tensor)
            stats = self._weight_stats[key]
        else:
            stats = _stats(tensor)
        keep = self.capture.keeps(stage, self.step, self.layer)
        self.records.append(TensorRecord(
            step=self.step, layer=self.layer, stage=stage, name=name, role=spec.role, symbolic=spec.shape,
            dtype=_dtype_name(tensor), shape=tuple(tensor.shape), _stats=stats,
            _values=(tensor.clone() if copy else tensor) if keep else None))

"""The trace: every tensor each stage shows, recorded while the model runs.

A `Recorder` is the sink that `stages.hooks.recording` installs. For every
record it notes where it was made (step, layer), its stage and name, dtype,
symbolic and concrete shape and summary statistics; it keeps the values
themselves only where the capture policy says so, and only up to a budget.

Weights are the model's own, not something the run computed: their records
keep statistics and a corner of the values, enough for the tables.
"""
import weakref
from dataclasses import dataclass, field

import torch

from stages.pipelines import PLAIN, Pipeline

STAT_NAMES = ("min", "max", "mean", "std")
WEIGHT_CORNER = (8, 16)  # rows, columns of a weight kept for previews
# id(weight) -> (a weak reference to it, its statistics); the reference tells a live entry from a stale one.
_WEIGHT_STATS: dict[int, tuple[weakref.ref, torch.Tensor | None]] = {}


@dataclass
class TensorRecord:
    step: int | None  # None: before the generation loop (stages 1 and 2)
    layer: int | None  # None: outside the blocks
    stage: int
    name: str
    role: str
    symbolic: str
    dtype: str  # the dtype the model computed in (values may be stored smaller: see Capture.store_dtype)
    shape: tuple[int, ...]
    _stats: torch.Tensor | None = field(default=None, repr=False)  # (4) float64, read back lazily
    _values: torch.Tensor | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[str, float] | None:
        if self._stats is None and self._values is not None:
            self._stats = _stats(self._values)  # kept exactly: computed when first asked for
        if self._stats is None:
            return None
        return dict(zip(STAT_NAMES, self._stats.tolist(), strict=True))

    @property
    def values(self) -> torch.Tensor | None:
        """The kept values on the CPU (a corner for weights), or None where only statistics were kept."""
        return None if self._values is None else self._values.cpu()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stats(t: torch.Tensor) -> torch.Tensor | None:
    if t.numel() == 0:
        return None
    real = torch.view_as_real(t) if t.is_complex() else t
    real = real.double() if not real.is_floating_point() else real
    lo, hi = torch.aminmax(real)
    # A sum and a norm are one fast pass each, with pairwise (accurate) accumulation; torch.std_mean
    # and float64 accumulation are ten times slower, and the trace must stay cheap.
    n = real.numel()
    mean = real.sum().double() / n
    square_mean = torch.linalg.vector_norm(real).double() ** 2 / n
    std = (square_mean - mean * mean).clamp(min=0).sqrt()
    return torch.stack([lo.double(), hi.double(), mean, std])  # stays on the device until read


@dataclass(frozen=True)
class Ranges:
    """A set of whole numbers as inclusive ranges: '0,3,5-7' is ((0, 0), (3, 3), (5, 7)).
    Held as ranges, never as the numbers, so that 'steps=0-99999999999' costs nothing."""
    spans: tuple[tuple[int, int], ...]

    def __contains__(self, value: int) -> bool:
        return any(lo <= value <= hi for lo, hi in self.spans)

    @property
    def largest(self) -> int:
        return max(hi for _, hi in self.spans)

    @classmethod
    def of(cls, *values: int) -> "Ranges":
        return cls(tuple((v, v) for v in sorted(set(values))))

    @classmethod
    def parse(cls, text: str, what: str) -> "Ranges":
        spans = []
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise ValueError(f"{what} must be numbers or ranges like 0,3,5-7, not {text!r}")
            spans.append((int(lo), int(hi) if dash else int(lo)))
            if spans[-1][0] > spans[-1][1]:
                raise ValueError(f"{what}: the range {part} runs backwards")
        return cls(tuple(spans))


@dataclass(frozen=True)
class Rule:
    """Records of these stages, steps and layers keep their values (None: any).
    The layer filter applies to the records made inside the blocks only."""
    stages: Ranges | None = None
    steps: Ranges | None = None
    layers: Ranges | None = None

    def matches(self, stage: int, step: int | None, layer: int | None) -> bool:
        return ((self.stages is None or stage in self.stages)
                and (step is None or self.steps is None or step in self.steps)
                and (layer is None or self.layers is None or layer in self.layers))

    @classmethod
    def parse(cls, text: str) -> "Rule":
        """'stages=10,13 layers=0-3 steps=0' (any of the three, space-separated)."""
        parts = {}
        for item in text.split():
            key, _, value = item.partition("=")
            if key not in ("stages", "steps", "layers") or not value:
                raise ValueError(f"a capture rule is 'stages=… steps=… layers=…', not {item!r}")
            parts[key] = Ranges.parse(value, key)
        return cls(**parts)


@dataclass(frozen=True)
class Capture:
    """The capture policy: which records keep values (any rule matches; records
    made before the loop always do), up to how many bytes, in which dtype."""
    rules: tuple[Rule, ...] = (Rule(steps=Ranges.of(0), layers=Ranges.of(0)),)
    max_bytes: int | None = None  # beyond it, statistics only
    store_dtype: torch.dtype | None = None  # e.g. torch.float16: floating values are kept smaller

    @classmethod
    def selected(cls, step: int = 0, layer: int = 0, *extra: Rule, **kw) -> "Capture":
        return cls((Rule(steps=Ranges.of(step), layers=Ranges.of(layer)), *extra), **kw)

    @classmethod
    def everything(cls, **kw) -> "Capture":
        return cls((Rule(),), **kw)

    def keeps(self, stage: int, step: int | None, layer: int | None) -> bool:
        return step is None or any(rule.matches(stage, step, layer) for rule in self.rules)


class Recorder:
    def __init__(self, capture: Capture = Capture(), pipeline: Pipeline = PLAIN):
        self.capture, self.pipeline = capture, pipeline
        self.records: list[TensorRecord] = []
        self.step: int | None = None
        self.layer: int | None = None
        self.kept_bytes = 0
        self.budget_hit_at: tuple[int | None, int | None] | None = None  # (step, layer) where values stopped
        self._kept_storages: set[int] = set()
        self._stats_here: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._converted: dict[tuple, torch.Tensor] = {}

    def at(self, **where: int | None) -> None:
        for key, value in where.items():
            setattr(self, key, value)
        self._stats_here.clear()
        self._converted.clear()

    def _statistics(self, tensor: torch.Tensor) -> torch.Tensor | None:
        # The same memory shown again (the stage 8 output as stage 9's input, a reshape, a
        # transpose) has the same statistics: compute them once per place in the run. The cache
        # holds the tensor, so its memory cannot be reused for another tensor meanwhile.
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype, tensor.device)
        if key not in self._stats_here:
            self._stats_here[key] = (tensor, _stats(tensor))
        return self._stats_here[key][1]

    def _keep(self, tensor: torch.Tensor, copy: bool, weight: bool) -> torch.Tensor | None:
        if weight:
            return (tensor[:WEIGHT_CORNER[0], :WEIGHT_CORNER[1]] if tensor.dim() == 2
                    else tensor[:WEIGHT_CORNER[1]]).clone()
        kept = tensor.clone() if copy else tensor
        store = self.capture.store_dtype
        if store is not None and kept.is_floating_point() and kept.dtype != store:
            kept = self._smaller(kept, store)
        storage = kept.untyped_storage().data_ptr()  # pairs and their complex view share memory
        if storage not in self._kept_storages:
            size = kept.untyped_storage().nbytes()
            if self.capture.max_bytes is not None and self.kept_bytes + size > self.capture.max_bytes:
                self.budget_hit_at = self.budget_hit_at or (self.step, self.layer)
                return None
            self._kept_storages.add(storage)
            self.kept_bytes += size
        return kept

    def _smaller(self, tensor: torch.Tensor, store: torch.dtype) -> torch.Tensor:
        """`tensor` in `store` dtype. Views of one piece of memory stay views of one converted
        copy (made once per step and layer, since the cache is written between steps)."""
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in self._converted:
            whole = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            whole.set_(tensor.untyped_storage(), 0, (tensor.untyped_storage().nbytes() // tensor.itemsize,))
            self._converted[key] = whole.to(store)
        return self._converted[key].as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

    def record(self, stage: int, name: str, tensor: torch.Tensor, copy: bool) -> None:
        spec = self.pipeline.stage(stage).spec(name)  # a name missing from the registry is a bug: fail loudly
        if tensor.is_meta:  # shapes only: there are no numbers to summarise or keep
            self.records.append(TensorRecord(step=self.step, layer=self.layer, stage=stage, name=name, role=spec.role,
                                             symbolic=spec.shape, dtype=dtype_name(tensor.dtype),
                                             shape=tuple(tensor.shape)))
            return
        weight = spec.role == "weight"
        if weight:
            # Weights do not change: their statistics are computed once per weight, for every run.
            known = _WEIGHT_STATS.get(id(tensor))
            if known is None or known[0]() is not tensor:
                known = _WEIGHT_STATS[id(tensor)] = (weakref.ref(tensor), _stats(tensor.detach()))
            weight_stats = known[1]
        tensor = tensor.detach()
        values = self._keep(tensor, copy, weight) if self.capture.keeps(stage, self.step, self.layer) else None
        # Values kept exactly give their statistics later, when asked for: the run stays fast.
        exact = values is not None and not weight and values.dtype == tensor.dtype
        self.records.append(TensorRecord(
            step=self.step, layer=self.layer, stage=stage, name=name, role=spec.role, symbolic=spec.shape,
            dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape),
            _stats=weight_stats if weight else None if exact else self._statistics(tensor), _values=values))

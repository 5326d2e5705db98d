"""The trace: every tensor each stage shows, recorded while the model runs.

A `Recorder` is the sink that `stages.hooks.recording` installs. For every
record it notes where it was made (step, layer), its stage and name, dtype,
symbolic and concrete shape and summary statistics; it keeps the values
themselves only where the capture policy says so, and only up to a budget.

Weights are the model's own, not something the run computed: their records
keep statistics and a corner of the values, enough for the tables.
"""
import math
import weakref
from dataclasses import dataclass, field

import torch

from stages.hooks import note_into
from stages.pipelines import PLAIN, Pipeline
from stages.registry import TensorSpec
from stages.training_stages import GRAD, UPDATE, WEIGHT_GRAD, grad_name

from .heap import old_objects_frozen
from .layer_plan import Call, LayerPlan, Planned, learn, signature_of
from .sums import Joined, Later, Sums, finished, group_key, summarise_rows, sums_of

STAT_NAMES = ("min", "max", "mean", "std")
WEIGHT_CORNER = (8, 16)  # rows, columns of a weight kept for previews
UPDATE_CORNER = (64, 64)  # of a weight's gradient and update: enough for a heatmap of how it changes
CORNERED = frozenset({"weight", WEIGHT_GRAD, UPDATE})  # weight-sized records: they keep a corner
BATCHED_NUMEL = 16384  # tensors up to this size wait for one batched statistics pass per step
PENDING_NUMEL = 1 << 22  # or fewer, when this many elements wait (16 MiB of float32)
# id(weight) -> (a weak reference to it, its version, its statistics, its corner); the reference tells a
# live entry from a stale one, the version a weight that training has changed since.
_WEIGHT_STATS: dict[int, tuple[weakref.ref, int, "Sums | None", torch.Tensor]] = {}


@dataclass(slots=True)
class TensorRecord:
    step: int | None  # None: before the generation loop (stages 1 and 2)
    layer: int | None  # None: outside the blocks
    stage: int
    name: str
    role: str
    symbolic: str
    dtype: str  # the dtype the model computed in (values may be stored smaller: see Capture.store_dtype)
    shape: tuple[int, ...]
    rank: int = 0  # the process that made it, in a tensor-parallel run (stages.tensor_parallel)
    _stats: torch.Tensor | None = field(default=None, repr=False)  # (4) float64: STAT_NAMES, once asked for
    # What the run computed them from (see _sums), or shared statistics computed later (see Later).
    _sums: "Sums | Later | None" = field(default=None, repr=False)
    _values: torch.Tensor | None = field(default=None, repr=False)

    @property
    def stats(self) -> dict[str, float] | None:
        if self._stats is None:
            # Values kept exactly give their statistics only when asked for: the run stays fast.
            sums = self._sums if self._sums is not None or self._values is None else sums_of(self._values)
            if isinstance(sums, Later):
                sums = sums.sums()
            if sums is None:
                return None
            self._stats = finished(sums)
        return dict(zip(STAT_NAMES, self._stats.tolist(), strict=True))

    @property
    def norm(self) -> float | None:
        """The L2 norm of the values (a gradient's size), from the statistics: √(n·(std² + mean²))."""
        stats = self.stats
        if stats is None:
            return None
        n = math.prod(self.shape) * (2 if self.dtype.startswith("complex") else 1)  # summed as (re, im) pairs
        return math.sqrt(n * (stats["std"] ** 2 + stats["mean"] ** 2))

    @property
    def values(self) -> torch.Tensor | None:
        """The kept values on the CPU (a corner for weights), or None where only statistics were kept.
        Values kept with a dimension split in two (see stages.hooks.record) are put in their shape here."""
        if self._values is None:
            return None
        values = self._values.cpu()
        if values.shape != self.shape and values.numel() == math.prod(self.shape):
            values = values.reshape(self.shape)
        return values


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return _DTYPE_NAMES[dtype]


_DTYPE_NAMES: dict[torch.dtype, str] = {}
_REAL_DTYPES = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _corner(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A copy of the first rows and columns of a weight-sized tensor (of a vector, the first columns)."""
    rows, cols = size
    return (t[:rows, :cols] if t.dim() == 2 else t[:cols]).clone()


@dataclass(frozen=True)
class Ranges:
    """A set of whole numbers as inclusive ranges: '0,3,5-7' is ((0, 0), (3, 3), (5, 7)).
    Held as ranges, never as the numbers, so that 'steps=0-99999999999' costs nothing."""
    spans: tuple[tuple[int, int], ...]

    def __contains__(self, value: int) -> bool:
        for lo, hi in self.spans:  # a plain loop: asked at every stage, step and layer of a run
            if lo <= value <= hi:
                return True
        return False

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
        return (self.stages is None or stage in self.stages) and self.matches_place(step, layer)

    def matches_place(self, step: int | None, layer: int | None) -> bool:
        """Whether the rule can keep anything at this step and layer (whatever the stage)."""
        return ((step is None or self.steps is None or step in self.steps)
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
    def __init__(self, capture: Capture = Capture(), pipeline: Pipeline = PLAIN, rank: int = 0):
        self.capture, self.pipeline, self.rank = capture, pipeline, rank
        self._records: list[TensorRecord | Planned | list[TensorRecord]] = []  # (see records)
        self._planned = 0  # how many blocks of _records wait to be made into records
        self.step: int | None = None
        self.layer: int | None = None
        self.kept_bytes = 0
        self.budget_hit_at: TensorRecord | None = None  # the first record that kept no values for it
        self._kept_storages: set[int] = set()
        # Statistics by the memory they describe, shared by the records that show it: those of one
        # place in the run (a step and layer), and those waiting for the step's batched pass. Each
        # entry holds its tensor, so that the memory cannot be given to another tensor meanwhile.
        self._sums_here: dict[tuple, tuple[torch.Tensor, Later]] = {}
        self._pending: dict[tuple, tuple[torch.Tensor, Later]] = {}
        self._pending_numel = 0  # the elements waiting: they hold memory, so they are bounded
        # Lasting memory already summarised (see _extended): where it begins -> (how many elements
        # from there, their statistics, the tensor: its memory is not given to another meanwhile).
        self._lasting: dict[tuple, tuple[int, Later, torch.Tensor]] = {}
        self._joins: list[Joined] = []  # made since the last batched pass, which finishes them
        # id(tensor) -> (it, its statistics): the tensor objects shown at this place (a stage's output is the
        # next stage's input), found by identity before their memory is looked for. Held: ids stay unique.
        self._seen: dict[int, tuple[torch.Tensor, Later | None]] = {}
        self._converted: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (memory, converted)
        self._rules_here: tuple[Rule, ...] = capture.rules  # the rules that can match this step and layer
        self._keeps_here: dict[int, bool] = {}  # stage -> whether its values are kept at this step and layer
        self._specs: dict[tuple, TensorSpec | None] = {}
        # Of a training step: id(activation) -> (it, the records of its gradient with whether they keep
        # values), until the backward pass hands autograd's gradient to the hook asked for it.
        self._gradients: dict[int, tuple[torch.Tensor, list[tuple[TensorRecord, bool]]]] = {}
        self._last_cornered: tuple[torch.Tensor | None, Sums | None] = (None, None)
        # The small tensors waiting for the batched pass, by group_key, and where their statistics go:
        # (a Later, None) or (a planned block's statistics, which of them) for each run of tensors.
        self._waiting: dict[tuple, tuple[list[torch.Tensor], list[tuple[Later | list, tuple[int, ...] | None]]]] = {}
        # A place that keeps no values notes its records' arguments here, made into records when it ends.
        self._calls: list[Call] | None = None
        # Blocks whose plan is applied at the step's end: (where their Planned is in _records, calls, step, layer).
        self._deferred: list[tuple[int, list[Call], int, int]] = []
        self._plans: dict[tuple, LayerPlan | None] = {}  # this step's, by the stages and names of a block's records

    @property
    def records(self) -> list[TensorRecord]:
        """Every record, in the order made. The records of a block made through a plan are made into
        TensorRecords only now, after the run."""
        self._flush()
        if self._planned:
            rank, made = self.rank, []
            with old_objects_frozen():  # (tens of thousands of new objects: see trace.heap)
                for item in self._records:
                    if type(item) is Planned:
                        for i, j in item.plan.shared:
                            item.sums[i] = item.sums[j]
                        made.extend([TensorRecord(item.step, item.layer, *fixed, rank, None, sums)
                                     for fixed, sums in zip(item.plan.fixed, item.sums, strict=True)])
                    elif type(item) is list:  # (a block that did not fit its plan: see _flush)
                        made.extend(item)
                    else:
                        made.append(item)
            self._records[:] = made  # (the same list: one read during the run goes on growing)
            self._planned = 0
        return self._records

    def at(self, **where: int | None) -> None:
        self._replay()
        if "step" in where or self._pending_numel > PENDING_NUMEL:  # one batched pass per step, if it is small
            self._flush()
        if "step" in where:
            self._gradients.clear()  # (a tensor whose gradient never came: it did not lead to the loss)
            self._last_cornered = (None, None)
            self._plans.clear()  # (shapes change from step to step)
        for key, value in where.items():
            setattr(self, key, value)
        self._sums_here.clear()
        self._seen.clear()
        self._converted.clear()
        # Which rules can keep values here is asked once per step and layer, not once per record.
        self._rules_here = tuple(r for r in self.capture.rules if r.matches_place(self.step, self.layer))
        self._keeps_here.clear()
        # A block whose values no rule keeps, outside training, is noted and made into records at its end.
        if self.layer is not None and self.step is not None and not self._rules_here and not torch.is_grad_enabled():
            self._note_calls()

    def _note_calls(self) -> None:
        """From now until the place ends, the calls are only noted (stages.hooks.note_into), made into
        records when it ends (see trace.layer_plan)."""
        self._calls = []
        note_into(self._calls)

    def _replay(self) -> None:
        """The records of the calls noted since the place began: through the plan of an earlier block
        with the same records where the block fits it, or one at a time (and a plan learned from them)."""
        calls = self._calls
        if calls is None:
            return
        self._calls = None
        note_into(None)
        signature = tuple(map(signature_of, calls))
        plan = self._plans.get(signature, False)
        if plan and (not plan.alone or plan.fits(calls)):
            later: list[Later | Sums | None] = [None] * len(calls)
            self._records.append(Planned(plan, later, self.step, self.layer))
            self._planned += 1
            for i in plan.weights:  # (now: a weight changed after the run must not change what this run shows)
                later[i] = self._weight(calls[i][2])[0]
            self._pending_numel += plan.batched_numel
            if plan.alone:  # (tensors too large to hold until the step's end)
                self._apply(plan, calls, later)
            else:  # at the step's end, all blocks at once: the recorder's own code and data stay in the
                # CPU's caches, which each block's matmuls empty (whether the block fits is asked there too)
                self._deferred.append((len(self._records) - 1, calls, self.step, self.layer))
            return
        start = len(self._records)
        for call in calls:
            self.record(*call)
        if plan is False:
            self._plans[signature] = learn(self._records[start:], calls)

    def _record_apart(self, calls: list[Call], step: int, layer: int) -> list[TensorRecord]:
        """The records of a block that was noted at (step, layer), made one at a time now."""
        here = self.step, self.layer, self._records, self._rules_here
        self.step, self.layer, self._records, self._rules_here = step, layer, [], ()  # (noted: it kept no values)
        self._sums_here.clear()
        self._seen.clear()
        self._keeps_here.clear()
        for call in calls:
            self.record(*call)
        made = self._records
        self.step, self.layer, self._records, self._rules_here = here
        self._sums_here.clear()
        self._seen.clear()
        self._keeps_here.clear()
        return made

    def _apply(self, plan: LayerPlan, calls: list[Call], later: list) -> None:
        """The statistics of a block's records, through its plan, into `later` (its weights' are there)."""
        for i in plan.asked:
            _, _, tensor, _, _, lasting = calls[i]
            later[i] = self._statistics(tensor, now=False, lasting=lasting)
        for i in plan.alone:
            later[i] = sums_of(calls[i][2])
        for key, group in plan.batched:  # (filled by the step's batched pass; shared ones when made: see records)
            tensors, targets = self._waiting_group(key)
            tensors.extend([calls[i][2] for i in group])
            targets.append((later, group))

    def _waiting_group(self, key: tuple) -> tuple[list[torch.Tensor], list]:
        if key not in self._waiting:
            self._waiting[key] = ([], [])
        return self._waiting[key]

    def _flush(self) -> None:
        """The statistics of the small tensors waiting, in one batched pass."""
        self._replay()
        for where, calls, step, layer in self._deferred:
            planned = self._records[where]
            if planned.plan.fits(calls):
                self._apply(planned.plan, calls, planned.sums)
            else:
                self._records[where] = self._record_apart(calls, step, layer)
        self._deferred.clear()
        for tensor, later in self._pending.values():
            tensors, targets = self._waiting_group(group_key(tensor))
            tensors.append(tensor)
            targets.append((later, None))
        for tensors, targets in self._waiting.values():
            rows, n = summarise_rows(tensors)
            row = iter(rows)
            for target, group in targets:  # a Later, or a planned block's statistics and which of them
                if group is None:
                    target.done((next(row), n))
                else:
                    for i in group:
                        target[i] = (next(row), n)
        self._waiting.clear()
        self._pending.clear()
        self._pending_numel = 0
        for joined in self._joins:  # in the order made: each joins statistics finished before it
            joined.sums()
        self._joins.clear()

    def _statistics(self, tensor: torch.Tensor, now: bool, lasting: bool) -> "Later | None":
        """The statistics of `tensor`, now or later. The same memory shown again (the stage 8 output
        as stage 9's input, a reshape, a transpose) has the same statistics: computed once."""
        shown = tensor
        seen = self._seen.get(id(shown))
        if seen is not None and not now:  # (the same tensor object, shown again)
            return seen[1]
        n = tensor.numel()
        if n == 0:
            return None
        strides = tensor.stride()
        if 0 in strides:  # a repetition (the keys of grouped-query attention) has the statistics of one copy
            for dim, step in enumerate(strides):
                if step == 0:
                    tensor = tensor.narrow(dim, 0, 1)
            n = tensor.numel()
        # Complex numbers are summarised as their (re, im) pairs: the same key as the pairs' memory.
        real = _REAL_DTYPES.get(tensor.dtype)
        key = (tensor.data_ptr(), n, tensor.dtype, tensor.device) if real is None else (
            tensor.data_ptr(), 2 * n, real, tensor.device)
        entry = self._sums_here.get(key) or self._pending.get(key)
        if entry is None:
            later = self._extended(tensor, key, n) if lasting else self._summarised(tensor, key, n, now)
            entry = self._sums_here[key] = (tensor, later)
        self._seen[id(shown)] = (shown, entry[1])
        return entry[1]

    def _summarised(self, tensor: torch.Tensor, key: tuple, n: int, now: bool) -> Later:
        if n <= BATCHED_NUMEL and not now:  # many small tensors: one pass for the step is far cheaper
            later = Later(tensor)
            self._pending[key] = (tensor, later)
            self._pending_numel += n
            return later
        return Later(None, sums_of(tensor))

    def _extended(self, tensor: torch.Tensor, key: tuple, n: int) -> Later:
        """The statistics of lasting memory (the filled part of the KV cache, shown whole at every step),
        summarised once: where an earlier record showed the start of this memory, only the elements
        beyond it are summarised, and joined to its statistics. Summarising the whole cache at every
        step would cost a tenth of a decode step; this costs a few numbers per new position."""
        if not tensor.is_contiguous():
            return self._summarised(tensor, key, n, now=False)
        where = (tensor.data_ptr(), tensor.dtype, tensor.device)
        before = self._lasting.get(where)
        if before is not None and before[0] == n:
            later = before[1]
        elif before is not None and before[0] < n:
            new = tensor.reshape(-1)[before[0]:]  # (n - before): the positions written since (a view: contiguous)
            later = Joined(before[1], self._summarised(new, (new.data_ptr(), n - before[0], *where[1:]), n - before[0],
                                                       now=False))
            self._joins.append(later)
        else:
            later = self._summarised(tensor, key, n, now=False)
        self._lasting[where] = (n, later, tensor)
        return later

    def _keep(self, tensor: torch.Tensor, copy: bool, record: "TensorRecord",
              corner: torch.Tensor | None = None) -> torch.Tensor | None:
        store = self.capture.store_dtype
        if corner is not None:  # a weight's, taken once
            kept = corner
        elif record.role in CORNERED:
            kept = _corner(tensor, UPDATE_CORNER)
        elif store is None or not tensor.is_floating_point() or tensor.dtype == store:
            kept = tensor.clone() if copy else tensor
        else:  # (a copy is converted on its own: it shares memory with nothing else kept)
            kept = tensor.to(store) if copy else self._smaller(tensor, store)
        storage = kept.untyped_storage().data_ptr()  # pairs and their complex view share memory
        if storage not in self._kept_storages:
            size = kept.untyped_storage().nbytes()
            if self.capture.max_bytes is not None and self.kept_bytes + size > self.capture.max_bytes:
                self.budget_hit_at = self.budget_hit_at or record  # (a gradient's: where it was asked for)
                return None
            self._kept_storages.add(storage)
            self.kept_bytes += size
        return kept

    def _smaller(self, tensor: torch.Tensor, store: torch.dtype) -> torch.Tensor:
        """`tensor` in `store` dtype. Views of one piece of memory stay views of one converted
        copy (made once per step and layer, since the cache is written between steps). The cache
        holds the memory it converted, so that no other tensor can be given it meanwhile."""
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in self._converted:
            whole = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
            whole.set_(tensor.untyped_storage(), 0, (tensor.untyped_storage().nbytes() // tensor.itemsize,))
            self._converted[key] = (whole, whole.to(store))
        return self._converted[key][1].as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

    def _spec(self, stage: int, name: str, required: bool = True) -> TensorSpec | None:
        if (stage, name) not in self._specs:  # a name missing from the registry is a bug: fail loudly
            tensors = self.pipeline.stage(stage).tensors
            self._specs[stage, name] = next((t for t in tensors if t.name == name), None)
            if required and self._specs[stage, name] is None:
                self.pipeline.stage(stage).spec(name)  # raises, naming what is missing
        return self._specs[stage, name]

    def _new_record(self, stage: int, spec: TensorSpec, tensor: torch.Tensor, shape) -> TensorRecord:
        record = TensorRecord(self.step, self.layer, stage, spec.name, spec.role, spec.shape, dtype_name(tensor.dtype),
                              tuple(shape or tensor.shape), self.rank)
        self._records.append(record)
        return record

    def record(self, stage: int, name: str, tensor: torch.Tensor, copy: bool,
               shape: tuple[int, ...] | None = None, lasting: bool = False) -> None:
        if self._calls is not None:  # (a copy, while calls are noted: they come first, and are made now)
            self._replay()
        spec = self._specs.get((stage, name)) or self._spec(stage, name)
        role = spec.role
        record = TensorRecord(self.step, self.layer, stage, name, role, spec.shape,
                              _DTYPE_NAMES.get(tensor.dtype) or dtype_name(tensor.dtype),
                              tuple(shape or tensor.shape), self.rank)
        self._records.append(record)
        if tensor.is_meta:  # shapes only: there are no numbers to summarise or keep
            return
        cornered = role in CORNERED
        corner = None
        if role == "weight":
            record._sums, corner = self._weight(tensor)
        elif cornered:  # a weight's gradient or update: new every training step (a tied weight's, shown twice)
            if self._last_cornered[0] is not tensor:
                self._last_cornered = (tensor, sums_of(tensor))
            record._sums = self._last_cornered[1]
        keeps = self._keeps_here.get(stage)
        if keeps is None:
            keeps = self._keeps_here[stage] = self.step is None or any(
                rule.stages is None or stage in rule.stages for rule in self._rules_here)
        if tensor.requires_grad:  # (detach costs more than asking, on the ~2,000 records of a step)
            if tensor.grad_fn is not None:  # an activation of a training step
                self._ask_for_gradient(stage, name, tensor, shape, keeps)
            tensor = tensor.detach()
        if keeps:
            record._values = self._keep(tensor, copy, record, corner)
        # Values kept exactly give their statistics later, when asked for: the run stays fast.
        if not cornered and (record._values is None or record._values.dtype != tensor.dtype):
            record._sums = self._statistics(tensor, now=copy, lasting=lasting)  # (copy: written in place later)

    @staticmethod
    def _weight(tensor: torch.Tensor) -> tuple[Sums | None, torch.Tensor]:
        """A weight's statistics and corner. Weights change only in training: these are taken once per
        weight (the model's own tensor object, not a detached copy of it) and version, for every run."""
        version = 0 if tensor.is_inference() else tensor._version  # (made under inference_mode: it has none)
        known = _WEIGHT_STATS.get(id(tensor))
        if known is None or known[0]() is not tensor or known[1] != version:
            weight = tensor.detach()
            known = _WEIGHT_STATS[id(tensor)] = (weakref.ref(tensor), version, sums_of(weight),
                                                 _corner(weight, WEIGHT_CORNER))
        return known[2], known[3]

    def _ask_for_gradient(self, stage: int, name: str, tensor: torch.Tensor, shape, keeps: bool) -> None:
        """A record of ∂loss/∂tensor, right after the tensor's, filled when the backward pass reaches it.
        A tensor shown at several stages gets one hook, which fills all its gradient records."""
        spec = self._spec(stage, grad_name(name), required=False)
        if spec is None or spec.role != GRAD:
            return
        record = self._new_record(stage, spec, tensor, shape)
        waiting = self._gradients.get(id(tensor))
        if waiting is None:
            self._gradients[id(tensor)] = (tensor, [(record, keeps)])
            tensor.register_hook(lambda grad, key=id(tensor): self._gradient_arrived(key, grad))
        else:
            waiting[1].append((record, keeps))

    def _gradient_arrived(self, key: int, grad: torch.Tensor) -> None:
        _, records = self._gradients.pop(key)
        sums, kept = sums_of(grad), None
        for record, keeps in records:
            record._sums = sums
            if keeps:  # (autograd may add into this tensor later: a copy is kept)
                # (a repeated view's gradient is whole: put in the shape the diagram shows)
                kept = kept if kept is not None else self._keep(grad.reshape(record.shape), True, record)
                record._values = kept

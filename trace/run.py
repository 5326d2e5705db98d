"""A traced run: the prompt through the model with a Recorder listening, and the
resulting trace: everything needed to show it, without the model."""
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from stages import Model, ModelConfig, Sampling, UserError, generate, tokenize
from stages.hooks import recording
from stages.text import stand_in_prompt
from stages.pipelines import PIPELINES, PLAIN, Pipeline
from stages.registry import Stage
from stages.tensor_parallel import current as current_shard
from stages.tensor_ids import NEXT_TOKEN_PROBS
from stages.training import StepResult, TrainingSetup

from .heap import generation_heap
from .recorder import Capture, Recorder, TensorRecord, dtype_name
from .values import counted

TOP_PIECES = 20  # for each step, the text of this many most likely next tokens is kept too


@dataclass(frozen=True)
class TrainingLog:
    """Of a traced training run: how it was set up, and each step's loss, gradient norm and batch."""
    setup: TrainingSetup
    steps: list[StepResult]


@dataclass
class Trace:
    model_name: str
    config: ModelConfig
    device: str
    dtype: str
    prompt: str
    chat: bool
    sampling: Sampling
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the generated text
    answer: str  # the text as the user reads it: without the token that ends the turn
    pieces: dict[int, str]  # token id -> its text, for every id the trace shows
    records: list[TensorRecord]
    capture: Capture
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the user must know (e.g. the budget was reached)
    source: str = ""  # the checkpoint's format and the RoPE layout its rows came in ("" in old trace files)
    shapes_only: bool = False  # run on the meta device: shapes and dtypes, no values, no token chosen
    pipeline: str = PLAIN.name  # the implementation that ran (stages.pipelines)
    ranks: int = 1  # the processes of a tensor-parallel run (--tp), each with its own records
    rank: int | None = None  # the one rank whose records this trace holds (see of_rank); None: every rank's
    training: TrainingLog | None = None  # a training run (`train`): the prompt is the text, prompt_ids its stream

    def of_rank(self, rank: int) -> "Trace":
        """What rank `rank` of a tensor-parallel run computed: its own slices and partial sums, and the
        results of the collectives (equal on every rank). The tables and pictures show one rank at a time."""
        if self.ranks == 1 and rank:
            raise UserError(f"--rank {rank}: this trace is not tensor-parallel (it ran in one process)")
        if not 0 <= rank < self.ranks:
            raise UserError(f"--rank {rank} does not exist: the run had {self.ranks} ranks (0-{self.ranks - 1})")
        return replace(self, records=[r for r in self.records if r.rank == rank], rank=rank)

    def heads_line(self) -> str:
        """Of one rank's view: the model's query and KV heads it holds, which it numbers from 0."""
        c, n = self.config, self.ranks
        q, kv = c.n_heads // n, c.n_kv_heads // n
        first_q, first_kv = self.rank * q, self.rank * kv
        def span(first: int, count: int) -> str:
            return f"{first}" if count == 1 else f"{first}-{first + count - 1}"
        kv_heads = "its KV head 0 is" if kv == 1 else f"its KV heads 0-{kv - 1} are"
        return (f"its query heads 0-{q - 1} are the model's {span(first_q, q)}, {kv_heads} the model's "
                f"{span(first_kv, kv)}")

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The 19 stages as the implementation that ran shows them."""
        return PIPELINES[self.pipeline].stages

    def stage(self, number: int) -> Stage:
        return self.stages[number - 1]

    @property
    def n_steps(self) -> int:
        """Forward passes made: one per generated token, the prompt step being step 0 (the only
        step of a shapes-only run, which chooses no token)."""
        if self.training is not None:
            return len(self.training.steps)
        return 1 if self.shapes_only else len(self.new_ids)

    def positions(self, step: int) -> tuple[int, int]:
        """(P, T) of a step: positions already cached, tokens fed (of a training step: none cached, T per row)."""
        if self.training is not None:
            return 0, self.training.setup.seq
        if step == 0:
            return 0, len(self.prompt_ids)
        return len(self.prompt_ids) + step - 1, 1

    def piece(self, token_id: int) -> str:
        return self.pieces.get(token_id, f"<{token_id}>")

    def describe(self, step: int, layer: int | None) -> str:
        """Where in the run: the step, and the layer (None: of a stage outside the blocks)."""
        of_layer = f" · layer {layer} of 0..{self.config.n_layers - 1}" if layer is not None else ""
        if self.training is not None:
            setup, result = self.training.setup, self.training.steps[step]
            return (f"training step {step} of 0..{self.n_steps - 1} (B={counted(setup.batch, 'row')} of "
                    f"T={setup.seq} tokens from token {result.offset}, loss {result.loss:.4f}){of_layer}")
        P, T = self.positions(step)
        kind = "prompt" if step == 0 else f"decode, feeds generated token {step}"
        rank = f" · rank {self.rank} of {self.ranks}" if self.rank is not None and self.ranks > 1 else ""
        return f"step {step} of 0..{self.n_steps - 1} ({kind}: P={P}, T={T}){of_layer}{rank}"

    def record(self, stage: int, name: str, step: int = 0, layer: int = 0) -> TensorRecord:
        """One record: `name` of `stage` at `step` and `layer` (ignored where the stage runs once)."""
        scope = self.stage(stage).scope
        step_, layer_ = (None, None) if scope == "run" else (step, None) if scope == "step" else (step, layer)
        for r in self.records:
            if r.stage == stage and r.name == name and r.step == step_ and r.layer == layer_:
                return r
        raise UserError(f"the trace has no record of stage {stage} {name!r} at step {step}, layer {layer}")

    def why_not_kept(self, record: TensorRecord) -> str | None:
        """Why a record that the capture policy keeps has no values (None: the policy did not keep it)."""
        if self.capture.max_bytes is not None and self.capture.keeps(record.stage, record.step, record.layer):
            return f"the trace budget of {self.capture.max_bytes / 2**20:.0f} MB ran out before it: a larger --max-trace-mb"
        return None

    def values(self, stage: int, name: str, step: int = 0, layer: int = 0):
        """The kept values of one record (a torch tensor on the CPU)."""
        values = self.record(stage, name, step, layer).values
        if values is None:
            raise UserError(f"the trace kept no values of stage {stage} {name!r} at step {step}, layer {layer}")
        return values

    def select(self, step: int, layer: int, stage: int | None = None) -> list[TensorRecord]:
        """The records of one step and layer (with those made once per run or per step), in order."""
        def wanted(r: TensorRecord) -> bool:
            scope = self.stage(r.stage).scope
            where = {"run": r.step is None, "step": r.step == step and r.layer is None,
                     "layer": r.step == step and r.layer == layer}[scope]
            return where and (stage is None or r.stage == stage)
        return [r for r in self.records if wanted(r)]


class TextStream:
    """Turns generated ids into printable text as they come, never splitting a
    multi-byte character and leaving out the token that ends the turn."""

    def __init__(self, model: Model, emit: Callable[[str], None]):
        self.model, self.emit, self.ids, self.shown = model, emit, [], ""

    def __call__(self, token_id: int) -> None:
        if token_id in self.model.tokenizer.stop_ids:
            return
        self.ids.append(token_id)
        text = self.model.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text


def _shown_ids(prompt_ids: list[int], new_ids: list[int], records: list[TensorRecord]) -> set[int]:
    ids = set(prompt_ids) | set(new_ids)
    for r in records:
        if (r.stage, r.name) == NEXT_TOKEN_PROBS and r.values is not None:
            ids.update(torch.topk(r.values, min(TOP_PIECES, r.values.numel())).indices.tolist())
    return ids


def capture_notes(recorder: Recorder, model: Model) -> list[str]:
    """What the user must know of how the values were kept."""
    notes, capture = [], recorder.capture
    if recorder.budget_hit_at:
        r = recorder.budget_hit_at
        where = ("the start" if r.step is None else f"step {r.step}") + (f", layer {r.layer}" if r.layer is not None else "")
        notes.append(f"the trace budget of {capture.max_bytes / 2**20:.0f} MB was reached at {where} (stage {r.stage} "
                     f"{r.name}): from there on, tensors kept their statistics only")
    if capture.store_dtype is not None:
        notes.append(f"values are stored as {dtype_name(capture.store_dtype)} (the model computed in "
                     f"{dtype_name(model.dtype)}); statistics are from the full values")
    return notes


def traced_run(model: Model, prompt: str, *, chat: bool = True, max_new_tokens: int = 32,
               sampling: Sampling = Sampling(), capture: Capture = Capture(),
               on_text: Callable[[str], None] | None = None, system: str | None = None,
               stand_in_tokens: int | None = None, pipeline: Pipeline = PLAIN) -> Trace:
    """The prompt (with the system prompt, in the chat template where `chat`) through the model,
    recorded. `stand_in_tokens` feeds that many placeholder ids instead of the prompt (for a
    shapes-only model without a tokenizer). `pipeline` is the implementation that runs."""
    shard = current_shard()
    recorder = Recorder(capture, pipeline, rank=shard.rank if shard else 0)
    started = time.perf_counter()
    with recording(recorder), generation_heap():
        if stand_in_tokens is not None:
            prompt_ids = stand_in_prompt(stand_in_tokens)
        else:
            prompt_ids = tokenize(model.tokenizer, prompt, chat, system)
        new_ids = generate(model, prompt_ids, max_new_tokens, sampling,
                           on_token=TextStream(model, on_text) if on_text else None, pipeline=pipeline)
    seconds = time.perf_counter() - started
    notes = capture_notes(recorder, model)
    tokenizer = model.tokenizer
    if tokenizer is None:  # stand-in ids: no text to show
        text, answer, pieces = "", "", {}
    else:
        text = tokenizer.decode(new_ids)
        answer = tokenizer.decode([i for i in new_ids if i not in tokenizer.stop_ids])
        pieces = {i: tokenizer.piece(i) for i in _shown_ids(prompt_ids, new_ids, recorder.records)}
    return Trace(model_name=model.name, config=model.config, device=model.device.type,
                 dtype=dtype_name(model.dtype), prompt=prompt, chat=chat, sampling=sampling,
                 prompt_ids=prompt_ids, new_ids=new_ids, text=text, answer=answer, pieces=pieces,
                 records=recorder.records, capture=capture, seconds=seconds, notes=notes, source=model.source,
                 shapes_only=model.device.type == "meta", pipeline=pipeline.name, ranks=shard.world if shard else 1,
                 rank=shard.rank if shard else None)

"""A traced run: the prompt through the model with a Recorder listening, and the
resulting trace with what is needed to show it."""
import time
from dataclasses import dataclass, field
from typing import Callable

from stages import Model, Sampling, generate, tokenize
from stages.hooks import recording
from stages.registry import stage as stage_info

from .recorder import Capture, Recorder, TensorRecord


@dataclass
class Trace:
    model: Model
    prompt: str
    chat: bool
    sampling: Sampling
    prompt_ids: list[int]
    new_ids: list[int]
    records: list[TensorRecord]
    capture: Capture
    seconds: float
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.model.tokenizer.decode(self.new_ids)

    @property
    def n_steps(self) -> int:
        """Forward passes made: one per generated token, the prompt step being step 0."""
        return len(self.new_ids)

    def positions(self, step: int) -> tuple[int, int]:
        """(P, T) of a step: positions already cached, tokens fed."""
        if step == 0:
            return 0, len(self.prompt_ids)
        return len(self.prompt_ids) + step - 1, 1

    def describe(self, step: int, layer: int) -> str:
        P, T = self.positions(step)
        kind = "prompt" if step == 0 else f"decode, feeds generated token {step}"
        last_layer = self.model.config.n_layers - 1
        return f"step {step} of 0..{self.n_steps - 1} ({kind}: P={P}, T={T}) · layer {layer} of 0..{last_layer}"

    def select(self, step: int, layer: int, stage: int | None = None) -> list[TensorRecord]:
        """The records of one step and layer (with those made once per run or per step), in order."""
        def wanted(r: TensorRecord) -> bool:
            scope = stage_info(r.stage).scope
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


def traced_run(model: Model, prompt: str, *, chat: bool = True, max_new_tokens: int = 32,
               sampling: Sampling = Sampling(), capture: Capture = Capture(),
               on_text: Callable[[str], None] | None = None) -> Trace:
    recorder = Recorder(capture)
    started = time.perf_counter()
    with recording(recorder):
        prompt_ids = tokenize(model.tokenizer, prompt, chat)
        new_ids = generate(model, prompt_ids, max_new_tokens, sampling,
                           on_token=TextStream(model, on_text) if on_text else None)
    return Trace(model=model, prompt=prompt, chat=chat, sampling=sampling, prompt_ids=prompt_ids,
                 new_ids=new_ids, records=recorder.records, capture=capture,
                 seconds=time.perf_counter() - started,
                 pieces=[model.tokenizer.piece(i) for i in prompt_ids])

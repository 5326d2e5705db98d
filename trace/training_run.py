"""A traced training run (`python -m trace train`): the text through a few steps of AdamW with a
Recorder listening, as a Trace that the tables, pictures and trace files show as they show a run."""
import time
from pathlib import Path
from typing import Callable

from stages import Model, Sampling, UserError, tokenize
from stages.hooks import recording
from stages.inputs import regular_file
from stages.pipelines import TRAINING
from stages.training import StepResult, TrainingSetup, train
from stages.training_text import DEFAULT_TEXT

from .heap import give_back_freed_memory, old_objects_frozen
from .recorder import Capture, Recorder, dtype_name
from .run import Trace, TrainingLog, capture_notes

MAX_TEXT_BYTES = 16 << 20  # a training text for a few traced steps; a corpus is not read whole


def read_training_text(path: Path | None) -> str:
    """The text of `path` (UTF-8), or the short text that ships with the project."""
    if path is None:
        return DEFAULT_TEXT
    regular_file(path, "text file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise UserError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MiB: a few traced steps need a short text "
                        f"(cut out a part of it)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} cannot be read)") from None
    if not text.strip():
        raise UserError(f"{path} holds no text to train on")
    return text


def traced_training(model: Model, text: str, setup: TrainingSetup, capture: Capture = Capture(),
                    on_step: Callable[[int, StepResult], None] | None = None) -> Trace:
    """`setup.steps` steps of AdamW on `text` (as plain text, no chat template), recorded. The model's
    weights are trained in memory: run it again, and it answers as the trained model."""
    if model.tokenizer is None:
        raise UserError(f"{model.name} comes without a tokenizer, so it cannot read a training text")
    recorder = Recorder(capture, TRAINING)

    def after_step(step: int, result: StepResult) -> None:
        give_back_freed_memory()
        if on_step is not None:
            on_step(step, result)

    started = time.perf_counter()
    with recording(recorder), old_objects_frozen():
        ids = tokenize(model.tokenizer, text, chat=False)  # stage 1
        steps = train(model, ids, setup, after_step)
    seconds = time.perf_counter() - started
    pieces = {i: model.tokenizer.piece(i) for i in set(ids)}
    return Trace(model_name=model.name, config=model.config, device=model.device.type,
                 dtype=dtype_name(model.dtype), prompt=text, chat=False, sampling=Sampling(), prompt_ids=ids,
                 new_ids=[], text="", answer="", pieces=pieces, records=recorder.records, capture=capture,
                 seconds=seconds, notes=capture_notes(recorder, model), source=model.source,
                 pipeline=TRAINING.name, training=TrainingLog(setup, steps))

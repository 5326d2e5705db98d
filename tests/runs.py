"""Running our stages with everything recorded, for comparisons."""
import torch

from stages import PLAIN, Pipeline, Sampling, generate
from stages.hooks import recording
from trace.recorder import Capture, Recorder


def record_run(model, ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
               pipeline: Pipeline = PLAIN):
    """(new ids, {(stage, name, layer, step): values}) with every value kept."""
    recorder = Recorder(Capture.everything(), pipeline)
    with recording(recorder):
        new_ids = generate(model, ids, max_new_tokens, sampling, pipeline=pipeline)
    return new_ids, {(r.stage, r.name, r.layer, r.step): r.values for r in recorder.records}


def assert_stages_match(ours: dict, theirs: dict, rtol: float, atol: float, step: int = 0):
    """Every reference tensor equals ours; reports the first that does not, by stage and name."""
    for (stage, name, layer), want in theirs.items():
        got = ours[(stage, name, layer, step)]
        where = f"stage {stage} {name!r} layer {layer}"
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=rtol, atol=atol,
                                   msg=lambda m, where=where: f"{where}: {m}")

"""What the trace records: names and order, capture policy, and no cost without a sink."""
import gc
import pickle
import platform

import torch

from stages import STAGES, generate
from stages import hooks
from stages.hooks import record
from trace import Capture, traced_run
from trace.heap import collections_paused, keep_freed_memory, old_objects_frozen
from trace.recorder import Recorder

# The ordered (stage, tensor) names recorded at the prompt step for layer 0,
# with the once-per-run and once-per-step stages around it.
PINNED = [
    (1, "token ids"), (2, "token ids"), (2, "tokens"), (3, "tokens"), (3, "tokens[P:P+T]"),
    (4, "tokens[P:P+T]"), (4, "tok_embeddings"), (4, "x"), (5, "x"),
    (6, "x"), (6, "attention_norm"), (6, "normalized x"), (7, "normalized x"),
    (8, "normalized x"), (8, "wq"), (8, "wk"), (8, "wv"), (8, "xq"), (8, "xk"), (8, "xv"),
    (9, "xq"), (9, "xk"), (9, "xv"), (9, "xq (reshaped)"), (9, "xk (reshaped)"), (9, "xv (reshaped)"),
    (10, "xq (reshaped)"), (10, "xk (reshaped)"), (10, "freqs_cis"), (10, "xq (pairs)"), (10, "xq (complex)"),
    (10, "xq (rotated)"), (10, "xk (pairs)"), (10, "xk (complex)"), (10, "xk (rotated)"),
    (11, "xk (rotated)"), (11, "xv (reshaped)"), (11, "cache_k"), (11, "cache_v"),
    (12, "xq (rotated)"), (12, "keys"), (12, "values"), (12, "keys (repeated)"), (12, "values (repeated)"),
    (12, "xq (transposed)"), (12, "keys (transposed)"), (12, "values (transposed)"),
    (13, "xq (transposed)"), (13, "keys (transposed)"), (13, "mask"), (13, "scores"), (13, "scores (softmax)"),
    (14, "scores (softmax)"), (14, "values (transposed)"), (14, "head outputs"), (14, "heads merged"),
    (14, "wo"), (14, "attention output"), (7, "attention output"),
    (15, "x"), (15, "attention output"), (15, "h"), (16, "h"), (16, "ffn_norm"), (16, "normalized h"),
    (17, "normalized h"), (17, "w1"), (17, "w3"), (17, "gate"), (17, "up"), (17, "gate * up"), (17, "w2"),
    (17, "ffn output"), (18, "h"), (18, "ffn output"), (18, "out"),
    (19, "out"), (19, "norm"), (19, "normalized out"), (19, "output"), (19, "logits"), (19, "probs"),
    (19, "next token"),
]


def test_recorded_names_for_one_layer_are_pinned(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3)
    assert [(r.stage, r.name) for r in trace.select(step=0, layer=0)] == PINNED


def test_registry_lists_exactly_what_each_stage_records(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3)
    for step in range(trace.n_steps):
        records = trace.select(step=step, layer=1)
        for s in STAGES:
            names = [r.name for r in records if r.stage == s.number]
            expected = [t.name for t in s.tensors if not (t.name == "mask" and step > 0)]  # no mask at T = 1
            assert names == expected, f"stage {s.number} at step {step}"
            for r in (r for r in records if r.stage == s.number):
                assert r.symbolic == s.spec(r.name).shape


def test_every_step_and_layer_has_statistics_but_only_the_selection_keeps_values(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, capture=Capture.selected(step=1, layer=1))
    layers = model.config.n_layers
    assert {(r.step, r.layer) for r in trace.records if r.layer is not None} == \
        {(step, layer) for step in range(3) for layer in range(layers)}
    for r in trace.records:
        assert r.stats is not None and set(r.stats) == {"min", "max", "mean", "std"}
        selected = r.step is None or (r.step == 1 and r.layer in (None, 1))
        assert (r.values is not None) == selected, (r.step, r.layer, r.stage, r.name)


def test_statistics_are_those_of_the_values(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=2, capture=Capture.everything())
    r = next(r for r in trace.records if r.stage == 17 and r.name == "gate" and r.layer == 1 and r.step == 1)
    v = r.values
    assert r.stats["min"] == v.min().item() and r.stats["max"] == v.max().item()
    assert abs(r.stats["mean"] - v.mean().item()) < 1e-6


def test_statistics_computed_as_the_run_goes_are_those_of_the_values(embedded_model):
    """Without kept values, statistics are computed during the run (small tensors in one batched pass
    per step, repetitions as one copy, the blocks after a step's first through the plan learned from
    it): they equal those of the values a full capture keeps."""
    ids = embedded_model.tokenizer.encode("The capital of France is", add_bos=False)
    runs = {}
    for label, capture in (("statistics", Capture(rules=())), ("values", Capture.everything())):
        recorder = Recorder(capture)
        with hooks.recording(recorder):
            generate(embedded_model, ids, 3)
        runs[label] = recorder.records
    computed = [r for r in runs["statistics"] if r.step is not None and r.role != "weight"]
    assert all(r.values is None for r in computed)
    kept = [r for r in runs["values"] if r.step is not None and r.role != "weight"]
    assert [(r.step, r.layer, r.stage, r.name) for r in computed] == [(r.step, r.layer, r.stage, r.name) for r in kept]
    for a, b in zip(computed, kept, strict=True):
        v = b.values.double() if not b.values.is_complex() else torch.view_as_real(b.values).double()
        if v.numel() == 0 or not torch.isfinite(v).all():  # the mask: -inf, mean and std undefined
            continue
        expected = torch.tensor([v.min(), v.max(), v.mean(), v.std(unbiased=False)], dtype=torch.float64)
        got = torch.tensor(list(a.stats.values()), dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * v.abs().max().item()), (a.step, a.layer, a.stage, a.name)


def test_a_copy_shown_inside_a_block_is_summarised_before_it_is_written_over():
    """A block that keeps no values is made into records when it ends (trace.layer_plan), but a tensor
    shown with copy=True is written in place later: its statistics are those it had when shown."""
    recorder = Recorder(Capture(rules=()))
    x = torch.arange(6.0)
    with hooks.recording(recorder), torch.no_grad():
        recorder.at(step=1, layer=0)
        record(6, "attention_norm", torch.ones(6))
        record(6, "x", x, copy=True)
        x += 100
        recorder.at(layer=1)
    assert [r.stats["max"] for r in recorder.records] == [1.0, 5.0]


def _block(recorder, layer, x, normalized, weight):
    recorder.at(layer=layer)
    record(6, "x", x)
    record(6, "attention_norm", weight)
    record(6, "normalized x", normalized)


def test_a_block_unlike_the_first_of_its_step_is_recorded_as_it_is():
    """Later blocks of a step go through the plan learned from the first (trace.layer_plan) only where
    their shapes, dtypes and shared memory are those of the first; the numbers are always their own."""
    recorder = Recorder(Capture(rules=()))
    x, weight = torch.arange(4.0), torch.ones(4)
    with hooks.recording(recorder), torch.inference_mode():
        recorder.at(step=1)
        _block(recorder, 0, x, x, weight)  # (one tensor shown twice)
        _block(recorder, 1, x, 10 * x, weight)  # two tensors
        _block(recorder, 2, torch.arange(5.0), torch.arange(5.0) + 1, torch.ones(5))  # other shapes
        _block(recorder, 3, x.double(), x.double(), weight.double())  # another dtype
        recorder.at(layer=None)
    shown = [(r.layer, r.name, r.dtype, r.shape, r.stats["max"]) for r in recorder.records]
    assert shown[3:] == [
        (1, "x", "float32", (4,), 3.0), (1, "attention_norm", "float32", (4,), 1.0), (1, "normalized x", "float32", (4,), 30.0),
        (2, "x", "float32", (5,), 4.0), (2, "attention_norm", "float32", (5,), 1.0), (2, "normalized x", "float32", (5,), 5.0),
        (3, "x", "float64", (4,), 3.0), (3, "attention_norm", "float64", (4,), 1.0), (3, "normalized x", "float64", (4,), 3.0)]


def test_a_planned_block_shows_its_weights_as_they_were_and_records_read_early_grow():
    recorder = Recorder(Capture(rules=()))
    x, weights = torch.arange(4.0), [torch.ones(4), torch.ones(4)]
    with hooks.recording(recorder), torch.inference_mode():
        recorder.at(step=1)
        read_early = recorder.records
        for layer, weight in enumerate(weights):
            _block(recorder, layer, x, x + 1, weight)
        recorder.at(layer=None)
    weights[1].mul_(3)  # (a notebook changing a weight after the run, before reading the trace)
    assert recorder.records is read_early and len(read_early) == 6
    assert [r.stats["max"] for r in read_early if r.name == "attention_norm"] == [1.0, 1.0]


def test_statistics_of_weights_whatever_their_layout_are_those_of_the_values(embedded_model):
    """Tall weights are stored column by column (stages.weights.for_decoding), the others row by row."""
    trace = traced_run(embedded_model, "Hi", chat=False, max_new_tokens=1)
    layer = embedded_model.weights.layers[0]
    shown = {"w1": layer.w1, "w2": layer.w2, "output": embedded_model.weights.output}
    assert not layer.w1.is_contiguous() and layer.w2.is_contiguous()
    for r in trace.records:
        if r.role == "weight" and r.name in shown and r.layer in (0, None):
            v = shown[r.name].double()
            expected = torch.tensor([v.min(), v.max(), v.mean(), v.std(unbiased=False)], dtype=torch.float64)
            got = torch.tensor(list(r.stats.values()), dtype=torch.float64)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * v.abs().max().item()), r.name  # (float32 sums)
            assert torch.equal(r.values, shown[r.name][:8, :16]), r.name  # the corner kept for previews


def test_statistics_of_the_cache_are_joined_step_by_step_and_travel_pickled(tiny):
    """The filled part of the KV cache is summarised once, the positions new at each step joined to the
    earlier ones, once for all the records that show it; a finished trace holds no tensor it does not
    keep, and a record sent to another process (tensor parallelism) carries the numbers themselves."""
    model, _ = tiny
    shown = traced_run(model, "the cat", chat=False, max_new_tokens=4, capture=Capture(rules=()))
    kept = traced_run(model, "the cat", chat=False, max_new_tokens=4, capture=Capture.everything())
    assert all(getattr(r._sums, "_tensor", None) is None and getattr(r._sums, "_parts", None) is None
               for r in shown.records)
    for step in range(4):
        cache_k = shown.record(11, "cache_k", step=step, layer=1)
        sent = pickle.loads(pickle.dumps(cache_k))
        assert cache_k.values is None and sent.stats == cache_k.stats
        values = kept.record(11, "cache_k", step=step, layer=1).values.double()
        assert cache_k.shape == tuple(values.shape)
        assert torch.allclose(torch.tensor(list(cache_k.stats.values()), dtype=torch.float64),
                              torch.stack([values.min(), values.max(), values.mean(), values.std(unbiased=False)]),
                              rtol=1e-5, atol=1e-6)
        for stage, name in ((12, "keys"), (12, "keys (repeated)"), (13, "keys (transposed)")):
            assert shown.record(stage, name, step=step, layer=1).stats == cache_k.stats


def test_cache_statistics_asked_for_before_the_steps_pass_are_joined_without_recursion():
    recorder = Recorder(Capture(rules=()))
    cache = torch.randn(3000, 2, 4)
    with hooks.recording(recorder):
        recorder.at(step=0, layer=0)
        for end in range(1, 3001):  # (as if 3,000 steps filled it: joins wait for the pass)
            record(11, "cache_k", cache[:end], lasting=True)
    early = recorder._records[-1].stats  # (before the pass: not through .records)
    assert torch.allclose(torch.tensor(list(early.values()), dtype=torch.float64),
                          torch.stack([cache.min(), cache.max(), cache.mean(), cache.std(unbiased=False)]).double(),
                          rtol=1e-5, atol=1e-6)


def test_a_record_pickled_before_its_batched_statistics_carries_them():
    recorder = Recorder(Capture(rules=()))
    x = torch.arange(6.0)
    with hooks.recording(recorder):
        recorder.at(step=0, layer=0)
        record(6, "x", x)
    sent = pickle.loads(pickle.dumps(recorder._records[0]))  # (before the step's pass: not through .records)
    assert sent.stats == recorder.records[0].stats
    assert sent.stats["max"] == 5.0 and sent.stats["mean"] == 2.5


def test_a_traced_run_leaves_the_garbage_collector_as_it_found_it():
    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with old_objects_frozen():
        assert gc.get_freeze_count() > 0  # (the objects made before are left out of its passes)
        cycle = Node()
        cycle.self = cycle
        del cycle
        assert gc.collect() > 0  # what the run makes is collected as usual
        with old_objects_frozen():  # one within another (the records made at a run's end)
            pass
        assert gc.get_freeze_count() > 0  # the outer one's freeze holds until it ends
    assert gc.get_freeze_count() == 0
    gc.freeze()  # someone else's freeze (a server's) is theirs to undo
    try:
        frozen = gc.get_freeze_count()
        with old_objects_frozen():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_a_traced_generation_makes_no_reference_cycle_so_collections_can_wait(tiny):
    """traced_run pauses the collector (trace.heap.collections_paused): that is safe only while a run
    leaves no cycle behind for it, which this checks."""
    model, _ = tiny
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with collections_paused():
            assert not gc.isenabled()
            trace = traced_run(model, "the cat", chat=False, max_new_tokens=4, capture=Capture.everything())
            assert gc.collect() == 0 and gc.garbage == []
        assert gc.isenabled() and len(trace.records) > 0
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    gc.disable()  # someone else's pause is theirs to end
    try:
        with collections_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_freed_memory_is_kept_for_the_next_step_where_the_c_library_is_glibc():
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_repeated_keys_are_the_cache_seen_n_rep_times_never_a_copy(tiny):
    model, _ = tiny
    n_rep = model.config.n_heads // model.config.n_kv_heads
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, capture=Capture.everything())
    for step in range(trace.n_steps):
        keys = trace.record(12, "keys", step=step, layer=1)
        for name, heads_first in (("keys (repeated)", False), ("keys (transposed)", True)):
            r = trace.record(12, name, step=step, layer=1)
            expected = keys.values.repeat_interleave(n_rep, dim=1)  # (P+T, H, Dh)
            assert r.shape == tuple(expected.transpose(0, 1).shape if heads_first else expected.shape)
            assert torch.equal(r.values, expected.transpose(0, 1) if heads_first else expected)
            assert r._values.untyped_storage().data_ptr() == keys._values.untyped_storage().data_ptr()


def test_recorded_snapshots_do_not_change_later(tiny):
    """The tokens tensor is written in place as tokens are generated: the trace keeps what each step saw."""
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=4, capture=Capture.everything())
    T0 = len(trace.prompt_ids)
    for step in range(trace.n_steps):
        tokens = next(r for r in trace.records if r.stage == 3 and r.name == "tokens" and r.step == step).values
        assert tokens[:T0 + step].tolist() == trace.prompt_ids + trace.new_ids[:step]
        assert (tokens[T0 + step:] == model.tokenizer.pad_id).all()


def test_without_a_sink_record_is_a_pass_through(tiny):
    model, _ = tiny
    assert hooks._sink is None  # nothing left installed by the traced runs before
    t = torch.ones(3)
    assert record(6, "x", t) is t
    ids = model.tokenizer.encode("the cat", add_bos=False)
    traced = traced_run(model, "the cat", chat=False, max_new_tokens=5)
    assert generate(model, ids, 5) == traced.new_ids


def test_a_tensor_name_means_one_tensor(tiny):
    """Where two stages record tensors of the same name, they hold the same numbers: a name is never
    reused for another tensor. A stage run once per step is compared with the first block when it
    comes before the blocks, with the last block when it comes after them."""
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=2, capture=Capture.everything())
    last = model.config.n_layers - 1

    def place(r, blocks_after: bool):
        return r.step, (r.layer if r.layer is not None else last if blocks_after else 0)

    compared = 0
    for a in trace.records:
        for b in trace.records:
            if a.name == b.name and a.stage < b.stage and place(a, a.stage > 18) == place(b, b.stage > 18):
                assert a.shape == b.shape and torch.equal(a.values, b.values), (a.name, a.stage, b.stage, a.layer)
                compared += 1
    assert compared > 100

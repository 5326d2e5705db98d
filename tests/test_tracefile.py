"""Trace files: saved, shown again without the model, compared; and bad files."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from stages import Sampling
from trace import Capture, traced_run
from trace.budget import estimate_bytes
from trace.recorder import Ranges, Rule
from trace.tracefile import load_trace, save_trace

from .craft import read_manifest, write_manifest
from .test_cli import QUESTION, cli


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One real run, saved: (the run's stdout, the file)."""
    path = tmp_path_factory.mktemp("traces") / "france.trace"
    result = cli("run", QUESTION, "--max-new-tokens", "6", "--stage", "13", "--step", "2", "--layer", "7",
                 "--save", str(path))
    assert result.returncode == 0, result.stderr
    return result.stdout, path


def test_show_renders_exactly_what_run_showed(saved):
    stdout, path = saved
    shown = cli("show", str(path), "--stage", "13", "--step", "2", "--layer", "7", LLAMA_TRACE_CACHE="/nonexistent")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == stdout


def test_show_json_and_tables_of_a_saved_trace(saved):
    _, path = saved
    table = cli("show", str(path), "--step", "2", "--layer", "7")
    assert table.returncode == 0 and "Shapes at step 2 of 0..5 (decode, feeds generated token 2: P=38, T=1)" \
        in table.stdout
    data = json.loads(cli("show", str(path), "--stage", "11", "--step", "2", "--layer", "7", "--json").stdout)
    cache_k = {t["name"]: t for t in data["stages"][0]["tensors"]}["cache_k"]
    assert cache_k["shape"] == [39, 3, 64] and len(cache_k["preview"]["values"]) == 6


def test_round_trip_keeps_every_record(tiny, tmp_path):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=4, capture=Capture.everything())
    loaded = load_trace(save_trace(trace, tmp_path / "t.trace", force=False))
    assert len(loaded.records) == len(trace.records)
    for a, b in zip(trace.records, loaded.records, strict=True):
        assert (a.step, a.layer, a.stage, a.name, a.dtype, a.shape) == (b.step, b.layer, b.stage, b.name, b.dtype,
                                                                         b.shape)
        assert str(a.stats) == str(b.stats)  # nan (masked scores) compares by text
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    assert (loaded.prompt_ids, loaded.new_ids, loaded.text, loaded.config) == \
        (trace.prompt_ids, trace.new_ids, trace.text, trace.config)


def test_a_version_2_file_opens_with_todays_tensor_names(tiny, tmp_path):
    """Version 2 called stage 14's per-head output "output" and stage 19's input "h": such a file still opens,
    its records under the names the registry uses now."""
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=2, capture=Capture.everything())
    header, manifest, data = read_manifest(save_trace(trace, tmp_path / "t.trace", force=False))
    old_names = {("14", "head outputs"): "output", ("14", "heads merged"): "output (transposed)",
                 ("19", "out"): "h", ("19", "normalized out"): "normalized h"}
    manifest["version"] = 2
    for entry in manifest["records"]:
        entry["name"] = old_names.get((str(entry["stage"]), entry["name"]), entry["name"])
    loaded = load_trace(write_manifest(tmp_path / "v2.trace", header, manifest, data))
    assert [(r.stage, r.name) for r in loaded.records] == [(r.stage, r.name) for r in trace.records]
    torch.testing.assert_close(loaded.values(19, "out", step=1), trace.values(19, "out", step=1), rtol=0, atol=0)


def test_views_are_stored_once(tiny, tmp_path):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, capture=Capture.everything())
    path = save_trace(trace, tmp_path / "t.trace", force=False)
    blocks = load_file(path)
    stored = sum(t.numel() * t.element_size() for t in blocks.values())
    shown = sum(r.values.numel() * r.values.element_size() for r in trace.records if r.values is not None)
    assert len(blocks) < sum(r.values is not None for r in trace.records) / 2
    assert stored < shown / 2  # reshapes, transposes and repeated inputs share their block


def test_same_prompt_model_and_seed_give_the_same_trace(tiny):
    model, _ = tiny
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=11)
    a, b = (traced_run(model, "the cat", chat=False, max_new_tokens=5, sampling=sampling,
                       capture=Capture.everything()) for _ in range(2))
    assert a.new_ids == b.new_ids
    for ra, rb in zip(a.records, b.records, strict=True):
        assert torch.equal(ra.values, rb.values) and str(ra.stats) == str(rb.stats)


def test_smaller_stored_dtype_is_said_and_statistics_stay_exact(tiny, tmp_path):
    model, _ = tiny
    exact = traced_run(model, "the cat", chat=False, max_new_tokens=2, capture=Capture.everything())
    small = traced_run(model, "the cat", chat=False, max_new_tokens=2,
                       capture=Capture.everything(store_dtype=torch.float16))
    loaded = load_trace(save_trace(small, tmp_path / "small.trace", force=False))
    assert any("stored as float16" in note for note in loaded.notes)
    for a, b in zip(exact.records, loaded.records, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(torch.tensor(list(b.stats.values())), torch.tensor(list(a.stats.values())),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)  # exact, up to summation order
        if a.role != "weight" and a.values.is_floating_point():
            assert b.values.dtype == torch.float16
            torch.testing.assert_close(b.values.float(), a.values, rtol=1e-2, atol=1e-2, equal_nan=True)


def test_the_budget_stops_keeping_values_and_says_so(tiny):
    model, _ = tiny
    full = traced_run(model, "the cat", chat=False, max_new_tokens=4, capture=Capture.everything())
    budget = 20_000
    capped = traced_run(model, "the cat", chat=False, max_new_tokens=4,
                        capture=Capture.everything(max_bytes=budget))
    kept = [r for r in capped.records if r.values is not None and r.role != "weight"]
    assert 0 < len(kept) < sum(r.values is not None and r.role != "weight" for r in full.records)
    assert any("budget" in note for note in capped.notes)
    assert all(r.stats is not None for r in capped.records)


@pytest.mark.parametrize("capture", [
    Capture.everything(), Capture.selected(0, 0), Capture.selected(2, 1),
    Capture((Rule(stages=Ranges.of(13)),)), Capture((Rule(stages=Ranges.of(11)),)),
    Capture((Rule(layers=Ranges.of(1)),)), Capture.everything(store_dtype=torch.float16)],
    ids=["all", "selected", "step 2 layer 1", "stage 13", "stage 11", "layer 1", "all as float16"])
def test_the_estimate_predicts_the_memory_kept(embedded_model, capture):
    from stages import generate, tokenize
    from stages.hooks import recording
    from trace.recorder import Recorder
    ids = tokenize(embedded_model.tokenizer, "Name three rivers and their countries.", chat=True)
    embedded_model.rotations(4096)  # as a longer run before this one leaves the model's table of rotations
    recorder = Recorder(capture)
    with recording(recorder):
        new = generate(embedded_model, ids, 6)
    assert len(new) == 6
    estimate = estimate_bytes(embedded_model.config, len(ids), 6, capture)
    assert 0.85 * recorder.kept_bytes <= estimate <= 1.15 * recorder.kept_bytes


def test_cli_estimate_and_budget():
    result = cli("run", QUESTION, "--capture", "all", "--estimate", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("capture 'all' would keep about ") and "37-token prompt" in result.stdout
    capped = cli("run", QUESTION, "--capture", "all", "--max-trace-mb", "20", "--max-new-tokens", "4")
    assert capped.returncode == 0
    assert "note: the trace budget of 20 MB was reached at step 0, layer" in capped.stderr


def test_diff_of_a_trace_with_itself_and_with_another_dtype(saved, tmp_path):
    _, path = saved
    same = cli("diff", str(path), str(path), "--step", "2", "--layer", "7")
    assert same.returncode == 0 and "same tokens" in same.stdout
    differences = [line.split("│")[-2].strip() for line in same.stdout.splitlines() if line.count("│") > 5]
    assert differences and set(differences) <= {"0", "", "values not kept", "0 ⌜"} and "0" in differences
    assert "0 ⌜" in differences and "⌜ of the kept corner only" in same.stdout  # (weights: a corner)
    other = tmp_path / "bf16.trace"
    assert cli("run", QUESTION, "--max-new-tokens", "6", "--dtype", "bfloat16", "--step", "2", "--layer", "7",
               "--save", str(other)).returncode == 0
    result = cli("diff", str(path), str(other), "--step", "2", "--layer", "7", "--stage", "13")
    assert result.returncode == 0 and "float32/bfloat16" in result.stdout


def _lying_manifest(path, to):
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    manifest = json.loads(header["__metadata__"]["llama-trace"])
    entry = next(r for r in manifest["records"] if r["values"] and r["role"] == "out" and len(r["shape"]) == 3)
    entry["shape"][0] += 1
    header["__metadata__"]["llama-trace"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    to.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    return to


BAD_FILES = {
    "missing": (lambda tmp, good: tmp / "nope.trace", "trace file not found"),
    "a directory": (lambda tmp, good: tmp, "is a directory"),
    "truncated": (lambda tmp, good: _write(tmp / "cut.trace", good.read_bytes()[:100_000]), "damaged"),
    "wrong magic": (lambda tmp, good: _write(tmp / "x.trace", b"GGUF" + bytes(200)), "not a trace file"),
    "lies about shapes": (lambda tmp, good: _lying_manifest(good, tmp / "lie.trace"), "says its shape is"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_trace_files_get_one_line(case, saved, tmp_path):
    make, message = BAD_FILES[case]
    result = cli("show", str(make(tmp_path, saved[1])))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_save_never_overwrites_without_force(tmp_path):
    mine = tmp_path / "mine.trace"
    mine.write_text("something of mine")
    result = cli("run", "hi", "--max-new-tokens", "2", "--save", str(mine))
    assert result.returncode == 1 and "exists already" in result.stderr and result.stdout == ""
    assert mine.read_text() == "something of mine"
    result = cli("run", "hi", "--max-new-tokens", "2", "--save", str(tmp_path / "no" / "such.trace"))
    assert result.returncode == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize("policy, message", [
    ("stages=x", "stages must be numbers"), ("colour=red", "a capture rule is"), ("layers=", "a capture rule is")])
def test_bad_capture_policies_get_one_line(policy, message):
    result = cli("run", "hi", "--capture", policy)
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1

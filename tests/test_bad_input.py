"""Bad input and faults, tried as a user or an attacker would: real files, real signals, real
concurrent processes. Each gets one clear line and a non-zero exit; nothing hangs, memory stays
bounded, and nothing the user had is lost, overwritten without --force, or left behind."""
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import Sampling, UserError
from stages.output import next_token_probs
from stages.config import TINY

from .craft import read_manifest, tiny_gguf, write_manifest
from .test_cli import QUESTION, ROOT, WIDTH, cli


def one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode not in (0, None), result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command line's own main() in this process: the same code as `python -m trace`, without
    starting Python and torch again (for the many cases that need no separate process)."""
    from trace.cli import main
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


# --- unbounded work from one argument -------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--capture", "steps=0-99999999999"], "step 99999999999 does not exist"),
    (["--capture", f"layers=0-{10**12}"], "layer 1000000000000 does not exist"),
    (["--capture", "stages=3-1"], "runs backwards"),
    (["--capture", "stages=0-40"], "stages are numbered 1-19"),
    (["--estimate", "--max-new-tokens", "100000000"], "exceeds the model's context of 8192 tokens"),
    (["--max-new-tokens", str(10**120)], "must be a whole number"),
], ids=["huge steps", "huge layers", "backwards", "stage 40", "estimate beyond the context", "huge count"])
def test_one_argument_never_costs_unbounded_work(args, message, capsys):
    try:
        result = cli_here(capsys, "run", "hi", *args)
    except SystemExit as e:  # argument errors end in argparse's exit(2), with one line
        result = subprocess.CompletedProcess(args, e.code, "", capsys.readouterr().err)
    one_error_line(result, message)


def test_an_estimate_for_the_whole_context_is_quick():
    result = cli("run", "hi", "--estimate", "--capture", "all", "--max-new-tokens", "8000", timeout=60)
    assert result.returncode == 0 and "would keep about" in result.stdout and "over the budget" in result.stdout


@pytest.mark.parametrize("what", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("command", ["show", "model"])
def test_devices_and_pipes_are_never_read(what, command, tmp_path, capsys):
    path = tmp_path / "pipe" if what == "fifo" else Path(what)
    if what == "fifo":
        os.mkfifo(path)
    args = ["show", str(path)] if command == "show" else ["run", "hi", "--model", str(path)]
    one_error_line(cli_here(capsys, *args), "not a regular file")


# --- crafted trace files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.trace"
    result = cli("run", "hi", "--max-new-tokens", "3", "--save", str(path))
    assert result.returncode == 0, result.stderr
    return path


def _first_with_values(manifest):
    return next(r for r in manifest["records"] if r["values"] and r["role"] == "out" and len(r["shape"]) == 2)


def _set(path_in_manifest, value):
    def change(manifest):
        *parents, last = path_in_manifest
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value
        return manifest
    return change


def _record_change(**fields):
    def change(manifest):
        _first_with_values(manifest).update(fields)
        return manifest
    return change


def _zero_strides(manifest):
    entry = _first_with_values(manifest)
    entry["shape"] = [100000, 100000]
    entry["values"].update(shape=[100000, 100000], stride=[0, 0])
    return manifest


def _repeated_keys(manifest):
    return next(r for r in manifest["records"] if r["name"] == "keys (repeated)" and r["values"])


def _split_of_another_tensor(manifest):
    entry = _first_with_values(manifest)
    rows, cols = entry["shape"]
    entry["values"].update(shape=[rows, 2, cols // 2], stride=[cols, 0, 1])
    return manifest


def _split_not_by_kv_heads(manifest):
    entry = _repeated_keys(manifest)
    positions, heads, head_dim = entry["shape"]
    entry["values"].update(shape=[positions, 1, heads, head_dim], stride=[head_dim, head_dim, 0, 1])
    return manifest


def _repetition_too_large_to_show(manifest):
    entry = _repeated_keys(manifest)
    _, heads, head_dim = entry["shape"]
    kv_heads = manifest["model"]["config"]["n_kv_heads"]
    entry["shape"] = [2**24, heads, head_dim]
    entry["values"].update(shape=[2**24, kv_heads, heads // kv_heads, head_dim])
    return manifest


CRAFTED = {
    "a list": (lambda m: [m], "not a JSON object"),
    "a number": (lambda m: 42, "not a JSON object"),
    "null": (lambda m: None, "not a JSON object"),
    "zero heads": (_set(["model", "config", "n_heads"], 0), "n_heads must be a whole number"),
    "string dim": (_set(["model", "config", "dim"], "576"), "model.config.dim has the wrong type"),
    "huge context": (_set(["model", "config", "max_seq_len"], 2**40), "max_seq_len must be"),
    "string in a shape": (_record_change(shape=["37", 576]), "shape[0] has the wrong type"),
    "string step": (_record_change(step="0"), "has the wrong type"),
    "negative layer": (_record_change(layer=-1), "lies outside the run"),
    "stage 99": (_record_change(stage=99), "names no stage"),
    "unknown tensor": (_record_change(name="secret"), "is no tensor of that stage"),
    "three statistics": (_record_change(stats=[0, 1, 2]), "has 3 statistics"),
    "zero strides, huge shape": (_zero_strides, "repeat more than grouped-query attention does"),
    "a split of a tensor GQA does not repeat": (_split_of_another_tensor, "says its shape is"),
    "a split that is not by KV heads": (_split_not_by_kv_heads, "says its shape is"),
    "a repetition too large to show": (_repetition_too_large_to_show, "would take more than"),
    "missing field": (lambda m: {k: v for k, v in m.items() if k != "records"}, "lacks field 'records'"),
    "extra sampling field": (_set(["sampling", "evil"], 1), "unknown field 'evil'"),
    "pieces of the wrong type": (_set(["pieces"], [1, 2]), "pieces has the wrong type"),
    "token id beyond the vocabulary": (_set(["new_ids"], [10**9]), "token ids do not fit"),
    "negative top-k": (_set(["sampling", "top_k"], -5), "top-k must be"),
    "unknown dtype": (_record_change(dtype="float128"), "unknown dtype"),
    "huge stats list": (_record_change(stats=[0.0] * 100000), "100000 statistics"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
@pytest.mark.parametrize("command", [["show"], ["show", "--stage", "13", "--json"], ["diff", "{good}"]],
                         ids=["show", "json", "diff"])
def test_crafted_trace_files_get_one_line(case, command, small_trace, tmp_path, capsys):
    change, message = CRAFTED[case]
    header, manifest, data = read_manifest(small_trace)
    bad = write_manifest(tmp_path / "bad.trace", header, change(manifest), data)
    args = [str(small_trace) if a == "{good}" else a for a in command]
    one_error_line(cli_here(capsys, args[0], str(bad), *args[1:]), message)


def test_markup_in_a_saved_model_name_is_shown_as_text(small_trace, tmp_path, capsys):
    header, manifest, data = read_manifest(small_trace)
    manifest["model"]["name"] = "[/dim]bad[bold"
    result = cli_here(capsys, "show", str(write_manifest(tmp_path / "name.trace", header, manifest, data)))
    assert result.returncode == 0, result.stderr
    assert "[/dim]bad[bold · L=30" in result.stdout


@pytest.mark.parametrize("cut", [0, 7, 8, 200, -1000])
def test_cut_files_get_one_line(cut, small_trace, tmp_path, capsys):
    data = small_trace.read_bytes()
    bad = tmp_path / "cut.trace"
    bad.write_bytes(data[:cut])
    one_error_line(cli_here(capsys, "show", str(bad)), "damaged" if cut else "only 0 bytes long")


def test_a_header_that_lies_about_its_length(small_trace, tmp_path, capsys):
    data = bytearray(small_trace.read_bytes())
    data[:8] = (2**63).to_bytes(8, "little")
    bad = tmp_path / "lie.trace"
    bad.write_bytes(bytes(data))
    one_error_line(cli_here(capsys, "show", str(bad)), "its header claims")


# --- crafted model files --------------------------------------------------------------------------

CRAFTED_MODELS = {
    "string head count": ({"llama.attention.head_count": ("string", "four")}, {}, "n_heads must be a whole number"),
    "zero heads": ({"llama.attention.head_count": ("uint32", 0)}, {}, "n_heads must be a whole number"),
    "a context of 2**32": ({"llama.context_length": ("uint64", 2**32)}, {}, "max_seq_len must be"),
    "another architecture": ({}, {}, "unsupported architecture 'mamba'"),
    "embeddings of the wrong width": ({}, {"token_embd.weight": np.zeros((TINY.vocab_size, 32), np.float32)},
                                      "tensor token_embd.weight has shape (300, 32)"),
    "no token list": ({"tokenizer.ggml.tokens": None}, {}, "lacks both llama.vocab_size and"),
    "token list of numbers": ({"tokenizer.ggml.tokens": ("array", list(range(300)))}, {},
                              "lacks tokenizer.ggml.tokens"),
    "bos beyond the vocabulary": ({"tokenizer.ggml.bos_token_id": ("uint32", 10**9)}, {},
                                  "bos_token_id is 1000000000"),
    "more tokens than embeddings": ({"llama.vocab_size": ("uint32", 100)}, {}, "has 300 tokens"),
    "a chat template that never ends": (
        {"tokenizer.chat_template": ("string", "{% for i in range(100000) %}{% for j in range(100000) %}"
                                               "{% endfor %}{% endfor %}")}, {}, "did not finish in 10 s"),
    "a chat template that builds a huge text": (
        {"tokenizer.chat_template": ("string", "{{ 'x' * 10000000000 }}")}, {}, "more memory"),
    "a chat template that raises": (
        {"tokenizer.chat_template": ("string", "{{ raise_exception('no system role') }}")}, {}, "no system role"),
    "a tokenizer pre-type of numbers": ({"tokenizer.ggml.pre": ("uint32", 7)}, {}, "unsupported tokenizer pre-type"),
    "NaN weights": ({}, {"output_norm.weight": np.full(TINY.dim, np.nan, np.float32)}, "not finite"),
}


@pytest.mark.parametrize("case", list(CRAFTED_MODELS))
def test_crafted_model_files_get_one_line(case, tmp_path, capsys):
    fields, tensors, message = CRAFTED_MODELS[case]
    path = tiny_gguf(tmp_path / "m.gguf", fields, tensors, arch="mamba" if "architecture" in case else "llama")
    one_error_line(cli_here(capsys, "run", "the cat", "--model", str(path), "--max-new-tokens", "2"), message)


def test_markup_in_a_model_name_is_shown_as_text(tmp_path, capsys):
    path = tiny_gguf(tmp_path / "m.gguf", {"general.name": ("string", "[/dim]x[bold]")})
    result = cli_here(capsys, "run", "the cat", "--model", str(path), "--raw", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "[/dim]x[bold] · L=2" in result.stdout


# --- sampling extremes ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [Sampling(temperature=1e-300), Sampling(temperature=5e-324),
                                      Sampling(temperature=1.0, top_p=0.0), Sampling(temperature=100.0, top_k=1),
                                      Sampling(temperature=2.0, top_p=1e-30, top_k=5)])
def test_sampling_extremes_give_probabilities(sampling):
    logits = torch.tensor([3.0, 1.0, 3.0 - 1e-3, -50.0, 20.0])
    probs = next_token_probs(logits, sampling)
    assert torch.isfinite(probs).all() and abs(probs.sum().item() - 1) < 1e-6
    assert probs.argmax().item() == 4


@pytest.mark.parametrize("kw, message", [({"temperature": float("inf")}, "temperature"),
                                         ({"top_p": 2.0}, "top-p"), ({"seed": 2**64}, "seed"),
                                         ({"top_k": -1}, "top-k")])
def test_impossible_sampling_is_refused(kw, message):
    with pytest.raises(UserError, match=message):
        Sampling(**kw)


@pytest.mark.parametrize("args, message", [(["--seed", str(2**64)], "from 0 to 18446744073709551615"),
                                           (["--temperature", "nan"], "from 0.0 to 100.0"),
                                           (["--top-p", "inf"], "from 0.0 to 1.0")])
def test_impossible_sampling_options_get_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_here(capsys, "run", "hi", *args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_tiny_temperature_is_greedy():
    result = cli("run", QUESTION, "--temperature", "1e-300", "--top-p", "0", "--seed", str(2**64 - 1),
                 "--max-new-tokens", "9")
    assert result.returncode == 0 and result.stdout.startswith("The capital of France is Paris."), result.stderr


# --- files the user owns --------------------------------------------------------------------------

def test_two_runs_saving_to_one_new_name_never_lose_a_trace(tmp_path):
    target = tmp_path / "same.trace"
    command = [sys.executable, "-m", "trace", "run", "hi", "--max-new-tokens", "3", "--save", str(target)]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    assert any("exists already" in err for code, err in results if code == 1)
    assert cli("show", str(target)).returncode == 0 and leftovers(tmp_path) == []


def test_force_never_replaces_a_device_or_a_pipe(tmp_path):
    fifo = tmp_path / "pipe.trace"
    os.mkfifo(fifo)
    one_error_line(cli("run", "hi", "--max-new-tokens", "2", "--save", str(fifo), "--force"), "not a regular file")
    assert fifo.is_fifo()


def test_a_dangling_link_is_not_replaced_without_force(tmp_path):
    link = tmp_path / "link.trace"
    link.symlink_to(tmp_path / "nowhere")
    one_error_line(cli("run", "hi", "--max-new-tokens", "2", "--save", str(link)), "exists already")
    assert link.is_symlink()


@pytest.mark.parametrize("name, message", [("no/such/folder/x.trace", "does not exist"),
                                           ("x" * 300 + ".trace", "file name is longer than"),
                                           ("", "is a directory")])
@pytest.mark.parametrize("option", ["--save", "--plot", "--diagram"])
def test_a_bad_output_path_is_found_before_the_run(name, message, option, tmp_path):
    path = str(tmp_path / name) if name else str(tmp_path) + "/"
    if option != "--save":
        path = path.replace(".trace", ".png")
    started = time.perf_counter()
    result = cli("run", QUESTION, "--stage", "13", option, path, "--max-new-tokens", "30")
    one_error_line(result, message)
    assert result.stdout == ""  # no answer: the model never ran
    assert time.perf_counter() - started < 60


def test_diagram_all_writes_nothing_when_one_file_exists(tmp_path):
    (tmp_path / "stage05.svg").write_text("mine")
    one_error_line(cli("diagram", "--all", str(tmp_path), "--symbolic"), "stage05.svg exists already")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage05.svg"]
    assert (tmp_path / "stage05.svg").read_text() == "mine"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_save_leaves_nothing_behind(sig, tmp_path):
    target = tmp_path / "big.trace"
    run = subprocess.Popen([sys.executable, "-m", "trace", "run", QUESTION, "--capture", "all",
                            "--max-new-tokens", "6", "--save", str(target)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while run.poll() is None and time.monotonic() < deadline:
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        if partial and partial[0].exists() and partial[0].stat().st_size > 0:
            run.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = run.communicate(timeout=120)
    assert run.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and err.strip().splitlines()[-1] in ("interrupted", "terminated")
    assert list(tmp_path.iterdir()) == []


# --- memory promises ------------------------------------------------------------------------------

def _peak_rss_mb(*args: str) -> float:
    """The peak resident memory of one CLI run, in a fresh process that only starts it."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "trace", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=True)
    return int(done.stdout) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is measured in KiB on Linux only")
def test_saving_stays_within_the_trace_budget(tmp_path):
    prompt = " ".join(["The river flows past the old mill and the children play by the water."] * 12)
    common = ["run", prompt, "--max-new-tokens", "4"]
    budget = 150
    plain = _peak_rss_mb(*common)
    saved = _peak_rss_mb(*common, "--capture", "all", "--max-trace-mb", str(budget), "--save", str(tmp_path / "t"))
    assert (tmp_path / "t").stat().st_size > budget * 2**20 * 0.8  # the budget was really used
    assert saved < plain + budget + 100, (plain, saved)


# --- the cached model -----------------------------------------------------------------------------

def test_a_damaged_cached_model_is_never_used_silently(embedded_path, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    copy = cache / embedded_path.name
    copy.write_bytes(embedded_path.read_bytes())
    assert cli("run", QUESTION, "--max-new-tokens", "9", LLAMA_TRACE_CACHE=str(cache)).stdout.startswith(
        "The capital of France is Paris.")
    with open(copy, "r+b") as f:  # a damaged disk block: same size
        f.seek(50_000_000)
        f.write(bytes(1 << 20))
    empty = tmp_path / "no-wheels"
    empty.mkdir()  # offline: the fresh fetch it tries fails, and says so
    result = cli("run", QUESTION, "--max-new-tokens", "9", LLAMA_TRACE_CACHE=str(cache), PIP_NO_INDEX="1",
                 PIP_FIND_LINKS=str(empty))
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    said = result.stderr.strip().splitlines()
    assert "embedded model" in said[0] and "is damaged (its checksum is wrong)" in said[0]
    assert "could not fetch the embedded model" in said[-1]


# --- terminal and pipes ---------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs a pipe of a chosen size (Linux)")
def test_a_closed_pipe_ends_quietly_with_status_141():
    for output in ("--json", "--stage 10"):  # (JSON is written as text, tables by rich)
        read, write = os.pipe()
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # less than the output: the command meets the closed end
        command = subprocess.Popen([sys.executable, "-m", "trace", "run", "hi", *output.split(), "--max-new-tokens",
                                    "2"], stdout=write, stderr=subprocess.PIPE, cwd=ROOT)
        os.close(write)
        first = os.read(read, 10)  # as `| head -c 10` does
        os.close(read)
        _, said = command.communicate(timeout=300)
        assert first and said == b"" and command.returncode == 141, output


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_cannot_show_every_character(encoding):
    result = subprocess.run([sys.executable, "-m", "trace", "run", QUESTION, "--max-new-tokens", "4", "--stage", "10"],
                            cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": encoding})
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert "Stage 10" in result.stdout.decode(encoding)


def test_a_prompt_that_is_not_utf8():
    result = subprocess.run([sys.executable.encode(), b"-m", b"trace", b"run", b"\xff\xfe hi"], cwd=ROOT,
                            capture_output=True, timeout=120, env={**os.environ, "COLUMNS": str(WIDTH)})
    one_error_line(subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                               result.stderr.decode()), "not valid UTF-8")


# --- the standard library's name ------------------------------------------------------------------

def test_python_m_trace_reaches_this_tool_from_any_folder(tmp_path):
    result = cli("stages", cwd=tmp_path)
    assert result.returncode == 0 and "The 19 stages" in result.stdout, result.stderr
    python_m = cli("stages", cwd=tmp_path, command=(sys.executable, "-m", "llama_trace"))
    assert python_m.returncode == 0 and python_m.stdout == result.stdout
    stdlib = subprocess.run([sys.executable, "-c", "import trace; print(trace.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert "llama" not in stdlib.stdout  # only `-m trace` is routed: other code still gets the standard library

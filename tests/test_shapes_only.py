"""--shapes-only: the stages on torch's meta device, for models whose weights are not here, and the
presets of the models the original drawings were made with."""
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import stages
from stages.embedded import cache_dir
from stages.presets import LLAMA_2_7B, LLAMA_3_1_8B
from trace.budget import memory_needs
from trace.cli import main
from trace.diagram import drawing, render
from trace.run import traced_run

DRAWINGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "nuts-and-bolts-diagrams" / \
    "llama3.1-8b-instruct"
# The drawings' run: a 22-token prompt, room for 200 tokens in all.
DRAWN = ["--model", "llama-3.1-8b", "--shapes-only", "--tokens", "22", "--max-new-tokens", "178"]


def run_json(capsys, *args: str) -> dict:
    assert main(["run", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _shapes(answer: dict) -> dict[int, dict[str, tuple[int, ...]]]:
    return {s["number"]: {t["name"]: tuple(t["shape"]) for t in s["tensors"]} for s in answer["stages"]}


def test_the_preset_shows_the_shapes_the_issue_names(capsys):
    answer = run_json(capsys, *DRAWN)
    shapes = _shapes(answer)
    assert answer["shapes_only"] and answer["model"]["device"] == "meta" and answer["model"]["dtype"] == "bfloat16"
    assert shapes[9]["xq (reshaped)"] == (22, 32, 128) and shapes[9]["xk (reshaped)"] == (22, 8, 128)
    assert shapes[13]["scores"] == (32, 22, 22)
    assert shapes[17]["gate * up"] == (22, 14336)
    assert shapes[19]["output"] == (128256, 4096) and shapes[19]["logits"] == (128256,)
    assert shapes[2]["tokens"] == (200,)
    # The preset's tokenizer.model is cached in a folder of its own: beside the embedded GGUF, transformers
    # would take it for that GGUF's tokenizer.
    assert not (cache_dir() / "tokenizer.model").exists()


@pytest.mark.skipif(not DRAWINGS.is_dir(), reason="the reference drawings are not beside this checkout")
def test_every_shape_printed_in_the_original_drawings_is_in_the_trace(capsys):
    """The drawings' boxes print concrete shapes such as '(22, 32, 128)': each one is a shape of the
    same stage's tensors, or (where a drawing shows its neighbours) of another stage's. The one
    exception is said: the drawings' head computes logits for all 22 positions and keeps the last;
    ours computes the last row only."""
    ours = _shapes(run_json(capsys, *DRAWN))
    everywhere = {shape for tensors in ours.values() for shape in tensors.values()}
    for path in sorted(DRAWINGS.glob("DIAG01-STAGE*.txt")):
        number = int(re.search(r"STAGE(\d+)", path.name).group(1))
        printed = {tuple(int(n) for n in m.group(1).split(","))
                   for line in path.read_text().splitlines()
                   if (m := re.fullmatch(r"\((\d+(?:,\s*\d+)*)\)", line.split("] ", 1)[-1].strip()))}
        assert printed, path.name
        missing = printed - everywhere - {(22, 128256)}
        assert not missing, f"stage {number}: {missing}"
    assert set(ours[13].values()) >= {(32, 22, 128), (22, 22), (32, 22, 22)}


def test_published_parameter_counts():
    assert memory_needs(LLAMA_3_1_8B, 22, 1, torch.bfloat16, tied=False)["parameters"] == 8_030_261_248
    assert memory_needs(LLAMA_2_7B, 22, 1, torch.float16, tied=False)["parameters"] == 6_738_415_616


def test_memory_needs_count_what_a_real_model_holds(embedded_model):
    w = embedded_model.weights
    tensors = {id(t): t for t in (w.tok_embeddings, w.norm, w.output)}
    tensors |= {id(getattr(layer, f.name)): getattr(layer, f.name) for layer in w.layers for f in fields(layer)}
    need = memory_needs(embedded_model.config, 10, 5, torch.float32, tied=True)
    assert need["parameters"] == sum(t.numel() for t in tensors.values())
    assert need["kv_cache"] == 2 * 30 * 3 * 64 * 15 * 4


def test_shapes_only_records_what_a_real_run_records(embedded_path):
    """The same stages, names, dtypes and shapes as a real run of the same model, without a number."""
    real = traced_run(stages.load_model(embedded_path, device="cpu"), "Hi there", max_new_tokens=1)
    meta_model = stages.load_model(embedded_path, shapes_only=True)
    assert meta_model.device.type == "meta"
    meta = traced_run(meta_model, "Hi there", max_new_tokens=1)
    assert meta.shapes_only and meta.new_ids == [] and meta.n_steps == 1
    assert [(r.stage, r.name, r.layer, r.dtype, r.shape) for r in meta.records if r.step in (None, 0)] == \
        [(r.stage, r.name, r.layer, r.dtype, r.shape) for r in real.records if r.step in (None, 0)]
    assert all(r.values is None and r.stats is None for r in meta.records if r.stage != 1)


def test_a_config_json_alone_runs_with_the_tokenizer_beside_it(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": 8192,
              "tie_word_embeddings": True, "rope_theta": 500000.0, "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(config))  # Llama 3.2 1B's shapes
    answer = run_json(capsys, "--model", str(tmp_path / "config.json"), "--shapes-only", "--tokens", "7")
    shapes = _shapes(answer)
    assert shapes[9]["xq (reshaped)"] == (7, 32, 64) and shapes[9]["xk (reshaped)"] == (7, 8, 64)
    assert answer["memory_bytes_of_a_real_run"]["parameters"] == 1_235_814_400  # Llama 3.2 1B, tied head


def test_the_drawing_of_a_shapes_only_run_shows_the_shapes(tmp_path):
    model = stages.load_model("llama-2-7b", dtype="bfloat16", shapes_only=True)
    trace = traced_run(model, "", max_new_tokens=1, stand_in_tokens=32)
    svg = render(drawing(13, trace, 0, 0), "svg").decode()
    assert "(32, 32, 32)" in svg and "bfloat16" in svg and "Llama 2 7B" in svg

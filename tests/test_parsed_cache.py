"""The embedded model parsed once: the same model from the parsed copy as from the GGUF file."""
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file, save_file

import stages
from stages.gguf_model import read_gguf
from stages.parsed_cache import read_parsed_once

IDENTITY = "a made-up identity of the file"


@pytest.fixture(scope="module")
def gguf_copy(embedded_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("parsed") / embedded_path.name
    shutil.copyfile(embedded_path, path)
    return path


@pytest.fixture(scope="module")
def direct(gguf_copy):
    """The model read from the GGUF file itself."""
    return read_gguf(gguf_copy)


def parsed(path):
    return path.with_name(path.name + ".parsed")


def assert_same_model(a, b):
    assert (a.name, a.config, a.source, a.tied) == (b.name, b.config, b.source, b.tied)
    text = "<|im_start|>user\nWhat is the capital of France? Ünïcödé ✓ 12345<|im_end|>"
    assert a.tokenizer.encode(text, add_bos=True) == b.tokenizer.encode(text, add_bos=True)
    assert a.tokenizer.stop_ids == b.tokenizer.stop_ids
    for name in ("tok_embeddings", "norm"):
        assert torch.equal(getattr(a.weights, name), getattr(b.weights, name))
    assert (a.weights.output is a.weights.tok_embeddings) == (b.weights.output is b.weights.tok_embeddings)
    for la, lb in zip(a.weights.layers, b.weights.layers, strict=True):
        for f in fields(la):
            assert torch.equal(getattr(la, f.name), getattr(lb, f.name)), f.name


def test_the_parsed_copy_holds_the_same_model(gguf_copy, direct):
    shutil.rmtree(parsed(gguf_copy), ignore_errors=True)
    first = read_parsed_once(gguf_copy, IDENTITY)  # parses the GGUF and writes the copy
    assert (parsed(gguf_copy) / "weights.safetensors").is_file()
    second = read_parsed_once(gguf_copy, IDENTITY)  # reads the copy
    assert_same_model(direct, first)
    assert_same_model(direct, second)
    half = read_parsed_once(gguf_copy, IDENTITY, dtype=torch.bfloat16)
    assert half.weights.layers[3].w2.dtype == torch.bfloat16
    assert torch.equal(half.weights.layers[3].w2, direct.weights.layers[3].w2.to(torch.bfloat16))
    assert read_parsed_once(gguf_copy, IDENTITY, shapes_only=True).weights is None


def test_tall_weights_come_from_the_copy_laid_out_for_decoding(gguf_copy, direct):
    """w1, w3 and the (tied) output head are stored transposed, so that they are read back stored
    column by column (stages.weights.for_decoding) without a copy; the others row by row."""
    read_parsed_once(gguf_copy, IDENTITY)  # (writes the copy where an earlier test has not)
    model = read_parsed_once(gguf_copy, IDENTITY)
    stored = load_file(parsed(gguf_copy) / "weights.safetensors")
    layer = model.weights.layers[2]
    for name in ("w1", "w3"):
        w = getattr(layer, name)
        assert w.shape == getattr(direct.weights.layers[2], name).shape and w.stride() == (1, w.shape[0]), name
        assert stored[f"layers.2.{name}"].shape == w.shape[::-1]
    for name in ("wq", "wk", "wv", "wo", "w2"):
        assert getattr(layer, name).is_contiguous(), name
    output = model.weights.output
    assert output is model.weights.tok_embeddings and output.stride() == (1, output.shape[0])


def test_tall_weights_are_stored_column_by_column_only_in_float32():
    """In float16 and bfloat16 torch's product on the CPU is slower on weights stored so: row by row."""
    for dtype, by_columns in (("float32", True), ("bfloat16", False)):
        model = stages.load_model(None, device="cpu", dtype=dtype)
        assert model.weights.layers[0].w1.is_contiguous() != by_columns, dtype
        assert model.weights.output.is_contiguous() != by_columns, dtype


def test_a_copy_made_from_another_file_is_replaced(gguf_copy, direct):
    read_parsed_once(gguf_copy, IDENTITY)
    model = read_parsed_once(gguf_copy, "the file was rewritten since")
    assert json.loads((parsed(gguf_copy) / "model.json").read_text())["made_from"] == "the file was rewritten since"
    assert_same_model(direct, model)
    assert sorted(p.name for p in gguf_copy.parent.iterdir()) == sorted([gguf_copy.name, parsed(gguf_copy).name])


def damage_meta(meta_path, change):
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(change(meta)))


def wrong_norm(folder):
    """A weights file whose final norm has a shape the config does not say, recorded as the folder's own."""
    weights = load_file(folder / "weights.safetensors")
    weights["norm"] = torch.ones(10)
    save_file(weights, folder / "weights.safetensors")
    st = (folder / "weights.safetensors").stat()
    damage_meta(folder / "model.json", lambda m: {**m, "weights": [st.st_size, st.st_mtime_ns, st.st_ino]})


DAMAGES = {
    "truncated weights": lambda f: os.truncate(f / "weights.safetensors", (f / "weights.safetensors").stat().st_size // 2),
    "bad json": lambda f: (f / "model.json").write_text("{not json"),
    "json not an object": lambda f: (f / "model.json").write_text("[]"),
    "weights missing": lambda f: (f / "weights.safetensors").unlink(),
    "source missing": lambda f: damage_meta(f / "model.json", lambda m: {k: v for k, v in m.items() if k != "source"}),
    "tied not a flag": lambda f: damage_meta(f / "model.json", lambda m: {**m, "tied": "no"}),
    "tokenizer fields missing": lambda f: damage_meta(f / "model.json", lambda m: {
        **m, "fields": {k: v for k, v in m["fields"].items() if k != "tokenizer.ggml.tokens"}}),
    "a weight of the wrong shape": wrong_norm,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_copy_is_parsed_anew(gguf_copy, direct, damage):
    read_parsed_once(gguf_copy, IDENTITY)
    DAMAGES[damage](parsed(gguf_copy))
    assert_same_model(direct, read_parsed_once(gguf_copy, IDENTITY))
    assert_same_model(direct, read_parsed_once(gguf_copy, IDENTITY))  # from the mended copy


def test_the_copy_is_as_readable_as_the_file_it_was_made_from(gguf_copy):
    shutil.rmtree(parsed(gguf_copy), ignore_errors=True)
    gguf_copy.chmod(0o644)
    read_parsed_once(gguf_copy, IDENTITY)
    assert stat.S_IMODE(parsed(gguf_copy).stat().st_mode) == 0o755
    for name in ("weights.safetensors", "model.json"):
        assert stat.S_IMODE((parsed(gguf_copy) / name).stat().st_mode) == 0o644


def test_a_disk_that_fills_up_costs_only_time(gguf_copy):
    """A real write error (a file size limit, as a full disk gives): the model still loads, nothing is left."""
    shutil.rmtree(parsed(gguf_copy), ignore_errors=True)
    code = ("import resource, sys, llama_trace; from pathlib import Path\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100 << 20, 100 << 20))\n"
            "from stages.parsed_cache import read_parsed_once\n"
            "model = read_parsed_once(Path(sys.argv[1]), 'an identity')\n"
            "print(model.config.n_layers, len(model.weights.layers))")
    result = subprocess.run([sys.executable, "-c", code, str(gguf_copy)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["30", "30"]
    assert sorted(p.name for p in gguf_copy.parent.iterdir()) == [gguf_copy.name]


def test_a_file_in_the_way_is_left_alone_and_costs_only_time(gguf_copy, direct):
    shutil.rmtree(parsed(gguf_copy), ignore_errors=True)
    parsed(gguf_copy).write_text("the user's own file")
    try:
        assert_same_model(direct, read_parsed_once(gguf_copy, IDENTITY))
        assert parsed(gguf_copy).read_text() == "the user's own file"
        assert sorted(p.name for p in gguf_copy.parent.iterdir()) == sorted([gguf_copy.name, parsed(gguf_copy).name])
    finally:
        parsed(gguf_copy).unlink()

"""The embedded model parsed once: the same model from the parsed copy as from the GGUF file."""
import json
import os
import shutil
from dataclasses import fields

import pytest
import torch

from stages.gguf_model import read_gguf
from stages.parsed_cache import read_parsed_once

IDENTITY = "a made-up identity of the file"


@pytest.fixture(scope="module")
def gguf_copy(embedded_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("parsed") / embedded_path.name
    shutil.copyfile(embedded_path, path)
    return path


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


def test_the_parsed_copy_holds_the_same_model(gguf_copy):
    shutil.rmtree(parsed(gguf_copy), ignore_errors=True)
    direct = read_gguf(gguf_copy)
    first = read_parsed_once(gguf_copy, IDENTITY)  # parses the GGUF and writes the copy
    assert (parsed(gguf_copy) / "weights.safetensors").is_file()
    second = read_parsed_once(gguf_copy, IDENTITY)  # reads the copy
    assert_same_model(direct, first)
    assert_same_model(direct, second)
    half = read_parsed_once(gguf_copy, IDENTITY, dtype=torch.bfloat16)
    assert half.weights.layers[3].w2.dtype == torch.bfloat16
    assert torch.equal(half.weights.layers[3].w2, direct.weights.layers[3].w2.to(torch.bfloat16))
    assert read_parsed_once(gguf_copy, IDENTITY, shapes_only=True).weights is None


def test_a_copy_made_from_another_file_is_replaced(gguf_copy):
    read_parsed_once(gguf_copy, IDENTITY)
    model = read_parsed_once(gguf_copy, "the file was rewritten since")
    assert json.loads((parsed(gguf_copy) / "model.json").read_text())["made_from"] == "the file was rewritten since"
    assert_same_model(read_gguf(gguf_copy), model)
    assert sorted(p.name for p in gguf_copy.parent.iterdir()) == sorted([gguf_copy.name, parsed(gguf_copy).name])


@pytest.mark.parametrize("damage", ["truncated weights", "bad json", "weights missing"])
def test_a_damaged_copy_is_parsed_anew(gguf_copy, damage):
    read_parsed_once(gguf_copy, IDENTITY)
    weights, meta = parsed(gguf_copy) / "weights.safetensors", parsed(gguf_copy) / "model.json"
    if damage == "truncated weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "bad json":
        meta.write_text("{not json")
    else:
        weights.unlink()
    assert_same_model(read_gguf(gguf_copy), read_parsed_once(gguf_copy, IDENTITY))
    assert_same_model(read_gguf(gguf_copy), read_parsed_once(gguf_copy, IDENTITY))  # from the mended copy


def test_a_file_in_the_way_is_left_alone_and_costs_only_time(gguf_copy):
    shutil.rmtree(parsed(gguf_copy), ignore_errors=True)
    parsed(gguf_copy).write_text("the user's own file")
    try:
        assert_same_model(read_gguf(gguf_copy), read_parsed_once(gguf_copy, IDENTITY))
        assert parsed(gguf_copy).read_text() == "the user's own file"
        assert sorted(p.name for p in gguf_copy.parent.iterdir()) == sorted([gguf_copy.name, parsed(gguf_copy).name])
    finally:
        parsed(gguf_copy).unlink()

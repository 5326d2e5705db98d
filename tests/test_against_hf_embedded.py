"""The embedded SmolLM2-135M-Instruct against transformers on the same GGUF file:
tokenizer, every stage of chosen layers, and greedy continuations."""
import pytest

from stages import tokenize

from trace.verify import hf_greedy, hf_stage_tensors
from .runs import assert_stages_match, record_run

TEXTS = ["What is the capital of France?", "Hello world 12345 café  \n\n  x", "def f(x):\n\treturn x**2  # ok",
         "<|im_start|>user\nHi<|im_end|>", "Ünïcödé 日本語 🙂 1,000.50$", "   leading and trailing   "]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_gives_the_reference_ids(embedded_model, hf_embedded, text):
    _, hf_tokenizer = hf_embedded
    ours = embedded_model.tokenizer.encode(text, add_bos=False)
    assert ours == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert embedded_model.tokenizer.decode(ours) == text


def test_chat_template_gives_the_reference_ids(embedded_model, hf_embedded):
    _, hf_tokenizer = hf_embedded
    question = "What is the capital of France?"
    want = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tokenize(embedded_model.tokenizer, question, chat=True) == list(want)


def test_every_stage_matches_hf(embedded_model, hf_embedded):
    hf, _ = hf_embedded
    ids = tokenize(embedded_model.tokenizer, "Why is the sky blue?", chat=True)
    _, ours = record_run(embedded_model, ids, 1)
    theirs = hf_stage_tensors(hf, ids)
    assert len(theirs) == 3 + 30 * 25
    assert_stages_match(ours, theirs, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("prompt", ["What is the capital of France?", "Write a haiku about the sea."])
def test_greedy_continuation_equals_hf(embedded_model, hf_embedded, prompt):
    hf, _ = hf_embedded
    ids = tokenize(embedded_model.tokenizer, prompt, chat=True)
    new_ids, _ = record_run(embedded_model, ids, 24)
    assert new_ids == hf_greedy(hf, ids, 24, embedded_model.tokenizer.stop_ids)


def test_the_capital_of_france(embedded_model):
    ids = tokenize(embedded_model.tokenizer, "What is the capital of France?", chat=True)
    new_ids, _ = record_run(embedded_model, ids, 16)
    assert embedded_model.tokenizer.decode(new_ids) == "The capital of France is Paris.<|im_end|>"

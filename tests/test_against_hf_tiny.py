"""Each stage against Hugging Face's LlamaForCausalLM on tiny random weights
(GQA, MHA and MQA), loaded through a real GGUF file."""
import torch

from stages import Sampling

from trace.verify import hf_greedy, hf_stage_tensors
from .runs import assert_stages_match, record_run

PROMPT = [0, 5, 17, 42, 99, 200, 7, 3, 150, 260]


def test_every_stage_of_every_layer_matches_hf(tiny):
    model, hf = tiny
    _, ours = record_run(model, PROMPT, 1)
    theirs = hf_stage_tensors(hf, PROMPT)
    assert len(theirs) == 3 + model.config.n_layers * 25  # all of them were compared
    assert {stage for stage, _, _ in theirs} == set(range(4, 20)) - {5}  # stage 5 hands on stage 18's output
    assert_stages_match(ours, theirs, rtol=1e-4, atol=1e-5)


def test_decode_steps_match_hf_full_recompute(tiny):
    model, hf = tiny
    new_ids, ours = record_run(model, PROMPT, 6)
    assert len(new_ids) == 6
    with torch.no_grad():
        full = hf(torch.tensor([PROMPT + new_ids])).logits[0]  # (T0 + 6, V), no cache
    for step in range(6):
        torch.testing.assert_close(ours[(19, "logits", None, step)], full[len(PROMPT) - 1 + step],
                                   rtol=1e-4, atol=1e-5)


def test_greedy_continuation_equals_hf_generate(tiny):
    model, hf = tiny
    new_ids, _ = record_run(model, PROMPT, 12)
    assert new_ids == hf_greedy(hf, PROMPT, 12, stop_ids={1})[:len(new_ids)]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    model, _ = tiny
    sampled = Sampling(temperature=1.5, top_p=0.9, seed=7)
    first, _ = record_run(model, PROMPT, 8, sampled)
    again, _ = record_run(model, PROMPT, 8, sampled)
    assert first == again
    greedy, _ = record_run(model, PROMPT, 8)
    top1, _ = record_run(model, PROMPT, 8, Sampling(temperature=1.0, top_k=1, seed=3))
    assert top1 == greedy

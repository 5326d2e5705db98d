"""The serving engine's layers (--impl packed) compute what the plain stages compute: every tensor
the two share, in every layer and step, and the same tokens; on Hugging Face-layout weights they
match transformers. What only one of them has is said, never silently compared."""
import pytest
import torch

from stages.pipelines import PACKED, PLAIN
from stages.rope import reorder
from trace import traced_run
from trace.verify import hf_stage_tensors

from .runs import assert_stages_match, record_run

PROMPT = [0, 5, 17, 42, 99, 200, 7, 3, 150, 260]


def _shared(plain: dict, packed: dict, head_dim: int) -> dict:
    """packed's values of every record plain also has, in plain's RoPE layout."""
    shared = {}
    for key, value in packed.items():
        if key in plain:
            spec = PACKED.stage(key[0]).spec(key[1])
            shared[key] = reorder(value, head_dim, to="interleaved") if spec.rope_ordered else value
    return shared


def _assert_same(plain: dict, packed: dict, head_dim: int, rtol: float, atol: float) -> int:
    shared = _shared(plain, packed, head_dim)
    for key, value in shared.items():
        torch.testing.assert_close(value, plain[key], rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, key=key: f"{key}: {m}")
    return len(shared)


def test_packed_equals_plain_on_tiny_models(tiny):
    model, _ = tiny
    plain_ids, plain = record_run(model, PROMPT, 4)
    packed_ids, packed = record_run(model, PROMPT, 4, pipeline=PACKED)
    assert packed_ids == plain_ids
    compared = _assert_same(plain, packed, model.config.head_dim, rtol=1e-5, atol=1e-5)
    # every layer of every step: the shared tensors are most of what either records
    assert compared > 0.75 * len(plain)
    assert {(stage, layer, step) for stage, _, layer, step in _shared(plain, packed, model.config.head_dim)} >= \
        {(18, layer, step) for layer in range(model.config.n_layers) for step in range(4)}


def test_packed_equals_plain_on_the_embedded_model(embedded_model):
    ids = list(range(100, 120))
    plain_ids, plain = record_run(embedded_model, ids, 3)
    packed_ids, packed = record_run(embedded_model, ids, 3, pipeline=PACKED)
    assert packed_ids == plain_ids
    # 30 layers of float32 sums in another grouping: the residual stream grows to ~1e3 in size
    assert _assert_same(plain, packed, embedded_model.config.head_dim, rtol=1e-4, atol=1e-3) > 1000


def test_packed_matches_transformers_on_hugging_face_layout_weights(tiny):
    model, hf = tiny
    _, packed = record_run(model, PROMPT, 1, pipeline=PACKED)
    theirs = {key: value for key, value in hf_stage_tensors(hf, PROMPT).items()
              if any(t.name == key[1] for t in PACKED.stage(key[0]).tensors)}
    assert len(theirs) > 20 * model.config.n_layers
    # transformers' q and k are in rotate-half order, as ours: verify gives them interleaved
    ours = {key: reorder(value, model.config.head_dim, to="interleaved")
            if PACKED.stage(key[0]).spec(key[1]).rope_ordered else value for key, value in packed.items()}
    assert_stages_match(ours, theirs, rtol=1e-4, atol=1e-5)


def test_packed_weights_are_the_checkpoints_rows_stacked(tiny):
    model, hf = tiny
    _, packed = record_run(model, PROMPT, 1, pipeline=PACKED)
    attention = hf.model.layers[0].self_attn
    qkv_proj = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    # the recorder keeps a corner of each weight
    corner = packed[(8, "qkv_proj", 0, 0)]
    torch.testing.assert_close(corner, qkv_proj[:corner.shape[0], :corner.shape[1]].detach())
    mlp = hf.model.layers[0].mlp
    corner = packed[(17, "gate_up_proj", 0, 0)]
    torch.testing.assert_close(corner, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[:corner.shape[0], :corner.shape[1]].detach())


PINNED_PACKED = [
    (1, "token ids"), (2, "token ids"), (2, "tokens"), (3, "tokens"), (3, "tokens[P:P+T]"),
    (4, "tokens[P:P+T]"), (4, "tok_embeddings"), (4, "x"), (5, "x"),
    (6, "x"), (6, "attention_norm"), (6, "normalized x"), (7, "normalized x"),
    (8, "normalized x"), (8, "qkv_proj"), (8, "qkv"), (8, "xq"), (8, "xk"), (8, "xv"),
    (9, "xq"), (9, "xk"), (9, "xv"), (9, "xq (reshaped)"), (9, "xk (reshaped)"), (9, "xv (reshaped)"),
    (10, "xq (reshaped)"), (10, "xk (reshaped)"), (10, "cos"), (10, "sin"), (10, "xq (rotate_half)"),
    (10, "xq (rotated)"), (10, "xk (rotate_half)"), (10, "xk (rotated)"),
    (11, "xk (rotated)"), (11, "xv (reshaped)"), (11, "cache_k"), (11, "cache_v"),
    (12, "xq (rotated)"), (12, "keys"), (12, "values"), (12, "keys (repeated)"), (12, "values (repeated)"),
    (12, "xq (transposed)"), (12, "keys (transposed)"), (12, "values (transposed)"),
    (13, "xq (transposed)"), (13, "keys (transposed)"), (13, "mask"), (13, "scores"), (13, "scores (softmax)"),
    (14, "scores (softmax)"), (14, "values (transposed)"), (14, "head outputs"), (14, "heads merged"),
    (14, "wo"), (14, "attention output"), (7, "attention output"),
    (15, "x"), (15, "attention output"), (15, "h"), (16, "h"), (16, "ffn_norm"), (16, "normalized h"),
    (17, "normalized h"), (17, "gate_up_proj"), (17, "gate_up"), (17, "gate * up"), (17, "w2"),
    (17, "ffn output"), (18, "h"), (18, "ffn output"), (18, "out"),
    (19, "out"), (19, "norm"), (19, "normalized out"), (19, "output"), (19, "logits"), (19, "probs"),
    (19, "next token"),
]


def test_recorded_names_of_the_packed_pipeline_are_pinned(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, pipeline=PACKED)
    assert trace.pipeline == "packed"
    assert [(r.stage, r.name) for r in trace.select(step=0, layer=0)] == PINNED_PACKED


@pytest.mark.parametrize("pipeline", [PLAIN, PACKED], ids=lambda p: p.name)
def test_each_pipeline_records_exactly_what_its_registry_lists(tiny, pipeline):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, pipeline=pipeline)
    for step in range(trace.n_steps):
        for layer in range(model.config.n_layers):
            records = trace.select(step=step, layer=layer)
            for s in pipeline.stages:
                names = [r.name for r in records if r.stage == s.number]
                assert names == [t.name for t in s.tensors if not (t.name == "mask" and step > 0)], \
                    f"stage {s.number}, step {step}, layer {layer}"

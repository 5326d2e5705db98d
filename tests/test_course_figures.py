"""The course's extra pictures (notebooks 1-4): each shows the numbers of a real run of the embedded model."""
import numpy as np
import pytest
import torch

from stages import Sampling
from stages.kv_cache import KVCache, kv_cache_bytes
from stages.logit_lens import logit_lens
from stages.output import next_token_probs
from trace import Capture, traced_run
from trace.attention_plots import attention_rows_figure, sink_figure, sink_shares
from trace.pieces import pieces_figure
from trace.rope_plot import rope_figure, rotation_speeds
from trace.sampling_plot import temperatures_figure
from trace.stream import logit_lens_figure, residual_stream_figure, stream_rows, stream_writes

from .test_cli import QUESTION


@pytest.fixture(scope="module")
def france(embedded_model):
    return traced_run(embedded_model, QUESTION, max_new_tokens=8, capture=Capture.everything())


def paris_step(trace) -> int:
    return [trace.piece(i) for i in trace.new_ids].index(" Paris")


def test_the_logit_lens_ends_with_the_models_own_logits_and_finds_paris_late(embedded_model, france):
    step = paris_step(france)
    lens = logit_lens(embedded_model, stream_rows(france, step))
    assert lens.shape == (embedded_model.config.n_layers + 1, embedded_model.config.vocab_size)
    torch.testing.assert_close(lens[-1], france.values(19, "logits", step=step))
    paris = france.new_ids[step]
    first = next(layer for layer, row in enumerate(lens) if int(row.argmax()) == paris)
    assert first == len(lens) - 1 or first > len(lens) // 2  # " Paris" comes out on top only in late layers
    fig = logit_lens_figure(france, lens, paris, step, piece=embedded_model.tokenizer.piece)
    ranks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert ranks[-1] == "rank 1" and ranks[0] != "rank 1"


def test_the_residual_stream_is_what_the_blocks_add_up_to(france):
    rows, writes = stream_rows(france, 0), stream_writes(france, 0)
    for layer in range(france.config.n_layers):
        added = france.values(15, "attention output", layer=layer)[-1] + france.values(18, "ffn output", layer=layer)[-1]
        torch.testing.assert_close(rows[layer + 1], rows[layer] + added, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(writes["stream read"], rows[:-1].norm(dim=-1).numpy(), rtol=1e-5)
    fig = residual_stream_figure(france, 0)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    np.testing.assert_allclose(heights, np.concatenate([writes["attention adds"], writes["FFN adds"]]), rtol=1e-6)


def test_attention_rows_are_the_recorded_softmax_of_the_last_query(france):
    step, layers = paris_step(france), [3, 20]
    fig = attention_rows_figure(france, step, layers)
    for ax, layer in zip([a for a in fig.axes if a.images], layers):
        want = france.values(13, "scores (softmax)", step=step, layer=layer)[:, -1, :]
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), want.numpy())
    assert fig.axes[-2].get_xlabel().startswith("key position")


def test_the_attention_sink_is_measured_from_the_run(france):
    shares = sink_shares(france, 0)
    probs = france.values(13, "scores (softmax)", layer=7)
    np.testing.assert_allclose(shares[7], probs[:, 1:, 0].mean(dim=1).numpy(), rtol=1e-6)
    assert ((0 <= shares) & (shares <= 1)).all()
    assert sink_figure(france, 0).axes[0].images


def test_temperature_panels_draw_what_sampling_draws_from(france):
    logits, chosen = france.values(19, "logits"), france.new_ids[0]
    unlikely = int(torch.argsort(logits)[len(logits) // 2])  # a token far down the list stays visible
    fig = temperatures_figure(logits, [0.5, 1.5], 0.9, unlikely, france.piece)
    for ax, temperature in zip([a for a in fig.axes if a.patches], [0.5, 1.5]):
        widths = np.array([bar.get_width() for bar in ax.patches])
        ids = torch.topk(logits, len(widths)).indices.tolist()
        ids[-1] = unlikely
        np.testing.assert_allclose(widths, next_token_probs(logits, Sampling(temperature=temperature))[ids].numpy())
        kept = int((next_token_probs(logits, Sampling(temperature=temperature, top_p=0.9)) > 0).sum())
        assert f"keeps {kept} token" in ax.get_title()
        assert ax.patches[-1].get_edgecolor()[:3] != ax.patches[0].get_edgecolor()[:3]  # the chosen one, framed
    assert chosen in torch.topk(logits, 15).indices.tolist()


def test_tokenization_shows_every_piece_and_id_in_order(france):
    texts = [t.get_text() for t in pieces_figure(france).axes[0].texts]
    pieces, ids = texts[0::2], texts[1::2]
    assert ids == [str(i) for i in france.prompt_ids]
    assert "".join(pieces).replace("␣", " ").replace("↵", "\n") == "".join(france.piece(i) for i in france.prompt_ids)


def test_rope_speeds_and_circles_are_the_models(france):
    config = france.config
    want = config.rope_theta ** (-np.arange(0, config.head_dim, 2) / config.head_dim)
    np.testing.assert_allclose(rotation_speeds(france), want, rtol=1e-4)
    fig = rope_figure(france, pairs=(0, 5))
    points = fig.axes[1].collections[0].get_offsets()
    np.testing.assert_allclose(np.hypot(points[:, 0], points[:, 1]), 1, rtol=1e-5)
    angles = np.unwrap(np.arctan2(points[:, 1], points[:, 0]))
    np.testing.assert_allclose(angles, np.arange(len(points)) * want[0], rtol=1e-4, atol=1e-4)


def test_the_kv_cache_formula_is_what_the_caches_allocate(embedded_model):
    c = embedded_model.config
    caches = [KVCache.empty(40, c.n_kv_heads, c.head_dim, "cpu", torch.float32) for _ in range(c.n_layers)]
    allocated = sum(t.numel() * t.element_size() for cache in caches for t in (cache.cache_k, cache.cache_v))
    assert kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, 40, torch.float32) == allocated
    assert kv_cache_bytes(c.n_layers, c.n_heads, c.head_dim, 40, torch.float32) == allocated * c.n_rep

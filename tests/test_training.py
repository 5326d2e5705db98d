"""A traced training step (`python -m trace train`): the loss, every gradient and AdamW's updates,
checked against Hugging Face's LlamaForCausalLM under torch.autograd, on the same weights."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import stages

from stages.hooks import recording
from stages.pipelines import TRAINING
from stages.rope import reorder
from stages.training import TrainingSetup, forward_loss, train, weight_places
from trace.recorder import Capture, Recorder
from trace.run import traced_run
from trace.tracefile import load_trace, save_trace
from trace.training_run import traced_training
from trace.verify import tiny_pair

from .test_cli import cli, lines_fit

B, T = 2, 8
HF_NAMES = {"attention_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
            "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}


@pytest.fixture
def pair(tmp_path):
    """A fresh tiny model (GQA) and transformers' model on the same random weights: training changes them."""
    return tiny_pair(tmp_path / "tiny.gguf", 4, 2)


def stream(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def traced_steps(model, ids, setup, capture=Capture.everything()):
    recorder = Recorder(capture, TRAINING)
    with recording(recorder):
        steps = train(model, ids, setup)
    return steps, recorder


def by_place(recorder) -> dict:
    return {(r.stage, r.name, r.layer, r.step): r for r in recorder.records}


def test_loss_and_every_gradient_equal_autograd_on_transformers(pair):
    model, hf = pair
    ids = stream(B * T + 1)
    inputs, targets = torch.tensor(ids[:-1]).view(B, T), torch.tensor(ids[1:]).view(B, T)
    # transformers, untraced: its own forward, F.cross_entropy, torch.autograd.
    out = hf(input_ids=inputs, output_hidden_states=True)
    for h in (*out.hidden_states, out.logits):
        h.retain_grad()
    hf_loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    hf_loss.backward()

    steps, recorder = traced_steps(model, ids, TrainingSetup(batch=B, seq=T, steps=1, clip=None))
    ours = by_place(recorder)
    assert steps[0].loss == pytest.approx(hf_loss.item(), rel=1e-5)
    logits = ours[(19, "logits", None, 0)].values
    assert ours[(19, "loss", None, 0)].values.item() == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel=1e-6)

    close = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[(19, "logits.grad", None, 0)].values, out.logits.grad, **close)
    for layer in range(model.config.n_layers):  # the residual stream into each block, and its gradient
        torch.testing.assert_close(ours[(5, "x", layer, 0)].values, out.hidden_states[layer].detach(), **close)
        torch.testing.assert_close(ours[(5, "x.grad", layer, 0)].values, out.hidden_states[layer].grad, **close)
    # Every weight's gradient: recorded as a corner; the full one is checked from the weights themselves.
    hf_params = dict(hf.named_parameters())
    head_dim = model.config.head_dim
    checked = 0
    for stage, layer, name, _ in weight_places(model.weights):
        hf_name = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}.get(name) \
            or f"model.layers.{layer}.{HF_NAMES[name]}"
        want = hf_params[hf_name + ".weight"].grad
        if name in ("wq", "wk"):  # transformers holds these rows in rotate-half order
            want = reorder(want, head_dim, "interleaved", dim=0)
        got = ours[(stage, f"{name}.grad", layer, 0)]
        assert got.shape == tuple(want.shape)
        corner = got.values
        torch.testing.assert_close(corner, want[tuple(slice(0, n) for n in corner.shape)], **close)
        assert got.norm == pytest.approx(want.norm().item(), rel=1e-3)
        checked += 1
    assert checked == 1 + 9 * model.config.n_layers + 2  # embeddings, the layers, final norm and head


def test_activation_gradients_equal_autograd_on_the_same_untraced_model(pair):
    model, _ = pair
    ids = stream(B * T + 1, seed=1)
    inputs, targets = torch.tensor(ids[:-1]).view(B, T), torch.tensor(ids[1:]).view(B, T)
    # Untraced: the same stages under plain autograd, with the tensors asked for kept by a grad hook of ours.
    params = [w for _, _, _, w in weight_places(model.weights)]
    for p in params:
        p.requires_grad_(True)
    loss = forward_loss(model, inputs, targets)
    grads = torch.autograd.grad(loss, list(dict.fromkeys(params)))
    for p in params:
        p.requires_grad_(False)
    _, recorder = traced_steps(model, ids, TrainingSetup(batch=B, seq=T, steps=1, clip=None, lr=1e-12,
                                                          weight_decay=0.0))
    ours = by_place(recorder)
    unique = list({id(place[3]): place for place in weight_places(model.weights)}.values())
    for (stage, layer, name, _), grad in zip(unique, grads, strict=True):
        corner = ours[(stage, f"{name}.grad", layer, 0)].values
        torch.testing.assert_close(corner, grad[tuple(slice(0, n) for n in corner.shape)], rtol=1e-5, atol=1e-7)
    # Every activation's gradient came, with statistics; the gradient of a view is its tensor's, reshaped.
    grads_recorded = [r for r in recorder.records if r.role == "grad"]
    assert len(grads_recorded) > 50 * model.config.n_layers
    assert all(r.stats is not None and r.values is not None for r in grads_recorded)
    for layer in range(model.config.n_layers):
        torch.testing.assert_close(ours[(9, "xq (reshaped).grad", layer, 0)].values.flatten(-2),
                                   ours[(8, "xq.grad", layer, 0)].values)
        # No cache: stage 12's keys are the rotated keys themselves, with the same gradient.
        torch.testing.assert_close(ours[(12, "keys.grad", layer, 0)].values, ours[(10, "xk (rotated).grad", layer, 0)].values)


def test_a_batch_equals_each_of_its_sequences_alone(pair):
    model, _ = pair
    ids = stream(B * T + 1, seed=2)
    inputs, targets = torch.tensor(ids[:-1]).view(B, T), torch.tensor(ids[1:]).view(B, T)

    def forward(rows) -> dict:
        recorder = Recorder(Capture.everything(), TRAINING)
        with recording(recorder), torch.no_grad():
            forward_loss(model, inputs[rows], targets[rows])
        return {(r.stage, r.name, r.layer): r.values for r in recorder.records}

    batch = forward(slice(None))
    compared = 0
    for b in range(B):
        alone = forward(slice(b, b + 1))
        for key, values in batch.items():
            spec = TRAINING.stage(key[0]).spec(key[1])
            if spec.shape.startswith("(B,"):
                torch.testing.assert_close(values[b], alone[key][0], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
                compared += 1
    assert compared > 2 * 40 * model.config.n_layers
    token_losses = batch[(19, "token losses", None)]
    assert batch[(19, "loss", None)].item() == pytest.approx(token_losses.mean().item(), rel=1e-6)


def test_the_loss_falls_on_a_fixed_text_and_the_run_repeats_exactly(tmp_path):
    losses = []
    for run in range(2):
        torch.manual_seed(0)  # the random weights
        model, _ = tiny_pair(tmp_path / f"tiny{run}.gguf", 4, 2)
        steps = train(model, stream(B * T + 1, seed=3), TrainingSetup(batch=B, seq=T, steps=8, lr=1e-2))
        losses.append([s.loss for s in steps])
    first = losses[0]
    assert first == losses[1]  # deterministic: the same weights, batches and optimiser
    assert first[-1] < 0.5 * first[0]


def test_adamw_updates_are_recorded_and_are_the_weights_change(pair):
    model, _ = pair
    before = model.weights.layers[1].w2.clone()
    _, recorder = traced_steps(model, stream(2 * B * T + 1, seed=4), TrainingSetup(batch=B, seq=T, steps=2))
    ours = by_place(recorder)
    changed = model.weights.layers[1].w2 - before
    update = ours[(17, "w2.update", 1, 0)].values + ours[(17, "w2.update", 1, 1)].values
    torch.testing.assert_close(update, changed[:update.shape[0], :update.shape[1]], rtol=1e-4, atol=1e-8)
    # AdamW's moments of the second step, and the batches of the two steps
    assert ours[(17, "w2.exp_avg_sq", 1, 1)].stats["min"] >= 0
    assert ours[(3, "tokens[P:P+T]", None, 1)].values[0, 0] == ours[(3, "tokens", None, 1)].values[B * T]
    torch.testing.assert_close(ours[(3, "targets", None, 0)].values[:, :-1], ours[(3, "tokens[P:P+T]", None, 0)].values[:, 1:])
    # Inference after training: the weights' statistics are the trained weights' (not remembered from before)
    after = traced_run(model, "", stand_in_tokens=4, max_new_tokens=1)
    w2 = after.record(17, "w2", 0, 1)
    trained = model.weights.layers[1].w2
    assert trained.max() != before.max() and w2.stats["max"] == trained.max().item()
    assert not any(p.requires_grad for _, _, _, p in weight_places(model.weights))


def test_training_changes_the_weights_held_and_stores_them_row_by_row(pair):
    """Tall weights are stored column by column for decoding (stages.weights.for_decoding); training
    stores them row by row, in place: a weight held before training is the trained one."""
    model, _ = pair
    w1, head = model.weights.layers[0].w1, model.weights.output
    assert not w1.is_contiguous() and not head.is_contiguous()
    before = w1.clone()
    train(model, stream(B * T + 1, seed=5), TrainingSetup(batch=B, seq=T, steps=1))
    assert model.weights.layers[0].w1 is w1 and model.weights.output is head
    assert w1.is_contiguous() and head.is_contiguous() and not torch.equal(w1, before)


def test_the_capture_budget_holds_for_gradients(pair):
    model, _ = pair
    budget = 256 * 1024
    _, recorder = traced_steps(model, stream(B * T + 1, seed=5), TrainingSetup(batch=B, seq=T, steps=1),
                               Capture.everything(max_bytes=budget))
    assert recorder.kept_bytes <= budget and recorder.budget_hit_at is not None
    grads = [r for r in recorder.records if r.role == "grad"]
    assert any(r.values is None for r in grads) and all(r.stats is not None for r in grads)
    # What is kept, counted from the records themselves: the weights' gradients and updates too.
    kept = {r._values.untyped_storage().data_ptr(): r._values.untyped_storage().nbytes()
            for r in recorder.records if r._values is not None}
    assert sum(kept.values()) <= budget


def test_values_stored_smaller_are_the_gradients_rounded(pair, tmp_path):
    model, _ = pair
    ids = stream(B * T + 1, seed=7)
    setup = TrainingSetup(batch=B, seq=T, steps=1)
    _, full = traced_steps(model, ids, setup)
    again = stages.load_model(tmp_path / "tiny.gguf", device="cpu")  # the same weights, untrained
    _, small = traced_steps(again, ids, setup, Capture.everything(store_dtype=torch.float16))
    full, small = by_place(full), by_place(small)
    grads = [key for key, r in full.items() if r.role in ("grad", "weight grad", "update")]
    assert len(grads) > 100
    for key in grads:
        want = full[key].values
        if small[key].role == "grad" and want.is_floating_point():
            assert small[key].values.dtype == torch.float16
        torch.testing.assert_close(small[key].values.to(want.dtype), want, rtol=2e-3, atol=1e-5)


def test_a_training_trace_saves_and_shows_as_it_was(pair, tmp_path):
    model, _ = pair
    ids = stream(3 * B * T, seed=6)
    text = " ".join(map(str, ids))  # the tiny model's tokenizer is bytes: any text will do
    trace = traced_training(model, text, TrainingSetup(batch=B, seq=T, steps=2))
    path = save_trace(trace, tmp_path / "t.trace", force=False)
    loaded = load_trace(path)
    assert loaded.training == trace.training and loaded.n_steps == 2
    assert [(r.stage, r.name, r.step, r.layer, r.role) for r in loaded.records] == \
        [(r.stage, r.name, r.step, r.layer, r.role) for r in trace.records]
    for a, b in zip(trace.records, loaded.records):
        assert a.stats == b.stats or (a.stats is not None and all(
            x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a.stats.values(), b.stats.values())))
        if a.values is not None:
            torch.testing.assert_close(b.values, a.values)


def test_train_command_end_to_end(tmp_path, embedded_path):
    saved, plot = tmp_path / "steps.trace", tmp_path / "learning.png"
    done = cli("train", "--steps", "2", "--batch", "1", "--seq", "16", "--same-batch", "--lr", "1e-3",
               "--save", str(saved), "--plot", str(plot), "--stage", "17", "--layer", "29")
    assert done.returncode == 0, done.stderr
    assert "2 training steps of B=1 × T=16 tokens" in done.stdout and "loss by step:" in done.stdout
    assert "Backward pass" in done.stdout and "w2.update" in done.stdout
    assert plot.read_bytes().startswith(b"\x89PNG")
    shown = cli("show", str(saved), "--json", "--stage", "19")
    answer = json.loads(shown.stdout)
    assert answer["training"]["setup"]["seq"] == 16 and len(answer["training"]["steps"]) == 2
    losses = [s["loss"] for s in answer["training"]["steps"]]
    assert losses[1] < losses[0]
    names = {t["name"]: t for t in answer["stages"][0]["tensors"]}
    assert names["logits"]["shape"] == [1, 16, 49152] and names["loss"]["shape"] == []
    assert "logits.grad" in names and "output.update" in names
    overview = cli("show", str(saved), "--plot", str(tmp_path / "overview.png"), "--layer", "29")
    assert overview.returncode == 0, overview.stderr
    not_kept = cli("show", str(saved), "--plot", str(tmp_path / "other.png"), "--step", "1")
    assert not_kept.returncode == 1 and "kept no values of wq's update at step 1" in not_kept.stderr
    assert (tmp_path / "overview.png").read_bytes().startswith(b"\x89PNG")
    # In 80 columns: nothing cut, the step's loss on the stage's frame, names that differ at their ends whole.
    narrow = cli("show", str(saved), "--stage", "19", "--step", "1", COLUMNS="80")
    assert lines_fit(narrow.stdout, 80) and f"loss {losses[1]:.4f})" in narrow.stdout
    assert "output.exp_avg " in narrow.stdout and "output.exp_avg_sq" in narrow.stdout and "…" not in narrow.stdout


def test_the_text_is_never_written_over_and_a_repeated_batch_is_said(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("One short note about the weather, and another about the sea. " * 2)
    for flag in ("--save", "--plot"):
        done = cli("train", str(text), flag, str(text), "--force", timeout=120)
        assert done.returncode == 1 and "which this command reads" in done.stderr, done.stderr
    assert text.read_text().startswith("One short note")
    again = cli("train", str(text), "--batch", "1", "--seq", "8", "--steps", "4", timeout=120)
    assert again.returncode == 0, again.stderr
    assert "from step 3 on they are read again" in " ".join(again.stdout.split())


@pytest.mark.parametrize("args, message", [
    (("--seq", "9000"), "longer than the model's context"),
    (("--batch", "2", "--seq", "512"), "B·T+1"),
    (("--step", "4"), "--step 4 does not exist: with --steps 4"),
    (("--capture", "steps=9"), "step 9 does not exist: with --steps 4"),
    (("--layer", "30"), "--layer 30 does not exist"),
    (("--plot", "{tmp}/x.txt"), "cannot tell the format"),
    (("--save", "{tmp}/no-such-folder/t.trace"), "no-such-folder"),
    (("--lr", "-1"), "--lr"),
    (("{tmp}/no-such-file.txt",), "text file not found"),
    (("--dtype", "float16"), "train keeps its weights in float32"),
    (("--model", "llama-3.1-8b"), "llama-3.1-8b has shapes only"),
    (("--batch", "1000", "--seq", "2048"), "smaller --batch or --seq"),
])
def test_bad_training_input_gets_one_clear_line(args, message, tmp_path):
    done = cli("train", *(a.replace("{tmp}", str(tmp_path)) for a in args), timeout=120)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_text_that_is_not_utf8_or_empty(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "empty.txt").write_text("  \n")
    for name, message in (("latin1.txt", "is not UTF-8 text"), ("empty.txt", "holds no text")):
        done = cli("train", str(tmp_path / name), timeout=120)
        assert done.returncode == 1 and message in done.stderr, done.stderr

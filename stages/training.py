"""A training step (seed 004): the text as one stream of ids, cut into a batch (B, T) with the
targets shifted by one; the forward pass with its batch dimension and no KV cache, through the
same stage functions as inference; the cross-entropy loss; backpropagation; AdamW.

What the backward pass computes for each activation is recorded by whoever listens (trace.recorder
asks autograd for it); the weights' gradients and AdamW's update of each weight are recorded here,
at the stage and layer where the weight is used.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block import forward_through_blocks
from .embedding import create_input_tensor
from .errors import UserError
from .hooks import active, at, record
from .model import Model
from .norm import rms_norm
from .training_stages import ADAMW_STATE, grad_name, update_name
from .weights import Weights

# Where each weight is used: (stage, its name there, its layer's attribute). The layers' come per layer.
LAYER_WEIGHTS = ((6, "attention_norm"), (8, "wq"), (8, "wk"), (8, "wv"), (14, "wo"), (16, "ffn_norm"),
                 (17, "w1"), (17, "w3"), (17, "w2"))


@dataclass(frozen=True)
class TrainingSetup:
    batch: int = 2  # B: sequences per step
    seq: int = 64  # T: tokens per sequence
    steps: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01  # AdamW's default
    clip: float | None = 1.0  # the gradients' total norm is clipped to this (None: not clipped)
    same_batch: bool = False  # every step on the first batch: the loss must fall (a model can learn it by heart)

    def __post_init__(self):
        for name in ("batch", "seq", "steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"--{name} must be a whole number of at least 1, not {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise UserError(f"the learning rate must be a positive number, not {self.lr!r}")
        if not 0 <= self.weight_decay < float("inf"):
            raise UserError(f"the weight decay must be 0 or positive, not {self.weight_decay!r}")
        if self.clip is not None and not 0 < self.clip < float("inf"):
            raise UserError(f"the gradient clipping norm must be positive, not {self.clip!r}")

    def check_fits(self, context: int) -> None:
        if self.seq > context:
            raise UserError(f"--seq {self.seq} is longer than the model's context of {context} tokens")

    def whole_batches(self, n_tokens: int) -> int:
        """How many batches of B·T+1 ids a stream of `n_tokens` holds, one after another."""
        return (n_tokens - 1) // self.tokens_per_step

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float  # the total norm of all weights' gradients, before clipping
    offset: int  # where in the stream the step's batch starts


def batch_offsets(n_tokens: int, setup: TrainingSetup, context: int) -> list[int]:
    """Where each step's B·T+1 ids start: the stream's whole batches in turn, from the start again
    when the text runs out (or always the first, with `same_batch`)."""
    setup.check_fits(context)
    whole = setup.whole_batches(n_tokens)
    if whole == 0:
        raise UserError(f"the text has {n_tokens} token{'' if n_tokens == 1 else 's'}; --batch {setup.batch} --seq {setup.seq} needs at least "
                        f"B·T+1 = {setup.tokens_per_step + 1} (a longer text, or a smaller batch)")
    return [0 if setup.same_batch else (step % whole) * setup.tokens_per_step for step in range(setup.steps)]


def cut_batch(tokens: torch.Tensor, offset: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3 of training. tokens (N) -> inputs (B, T) and targets (B, T), the same ids one further."""
    record(3, "tokens", tokens)
    window = tokens[offset:offset + batch * seq + 1]  # (B·T+1)
    inputs = record(3, "tokens[P:P+T]", window[:-1].view(batch, seq))  # (B·T) -> (B, T)
    targets = record(3, "targets", window[1:].view(batch, seq))  # (B·T) -> (B, T)
    return inputs, targets


def loss_head(h: torch.Tensor, norm: torch.Tensor, output: torch.Tensor, eps: float,
              targets: torch.Tensor) -> torch.Tensor:
    """Stage 19 of training. h (B, T, D) -> final norm -> logits (B, T, V), float32 -> log_softmax ->
    token losses (B, T), each -log p(target) -> loss (), their mean: F.cross_entropy, written out."""
    record(19, "out", h)
    record(19, "norm", norm)
    normalized = record(19, "normalized out", rms_norm(h, norm, eps))
    record(19, "output", output)
    logits = record(19, "logits", F.linear(normalized, output).float())  # (B, T, V)
    record(19, "targets", targets)
    log_probs = record(19, "log probs", F.log_softmax(logits, dim=-1))  # (B, T, V)
    token_losses = -log_probs.gather(-1, targets[..., None]).squeeze(-1)  # (B, T, 1) -> (B, T)
    return record(19, "loss", record(19, "token losses", token_losses).mean())


def forward_loss(model: Model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Stages 4, 5 and 19 of training. inputs (B, T), targets (B, T) -> loss ()."""
    config, weights = model.config, model.weights
    x = create_input_tensor(inputs, weights.tok_embeddings)  # (B, T, D)
    freqs_cis = model.rotations(inputs.shape[-1]).clone()  # (T, Dh/2): positions 0..T-1 of every row
    no_cache = [None] * len(weights.layers)
    h = forward_through_blocks(x, weights.layers, no_cache, freqs_cis, 0, config)  # (B, T, D)
    return loss_head(h, weights.norm, weights.output, config.norm_eps, targets)


def weight_places(weights: Weights) -> list[tuple[int, int | None, str, torch.Tensor]]:
    """(stage, layer, name, weight) for every use of a weight, in the order of the stages. A tied
    output head is tok_embeddings again (the same tensor, listed at both its uses)."""
    places = [(4, None, "tok_embeddings", weights.tok_embeddings)]
    for i, layer in enumerate(weights.layers):
        places += [(stage, i, name, getattr(layer, name)) for stage, name in LAYER_WEIGHTS]
    return places + [(19, None, "norm", weights.norm), (19, None, "output", weights.output)]


def parameters(weights: Weights) -> list[torch.Tensor]:
    """Every weight once (a tied head is not a second parameter)."""
    unique = {id(w): w for _, _, _, w in weight_places(weights)}
    return list(unique.values())


def _record_at_weights(places, name_of, tensor_of) -> None:
    """For each weight, `tensor_of` it (made once, even for a weight used twice) recorded at its places."""
    uses: dict[int, list] = {}
    for place in places:
        uses.setdefault(id(place[3]), []).append(place)
    for same_weight in uses.values():
        tensor = tensor_of(same_weight[0][3])
        for stage, layer, name, _ in same_weight:
            at(layer=layer)
            record(stage, name_of(name), tensor)
    at(layer=None)


def adamw_step(optimizer: torch.optim.AdamW, places, clip: float | None, before: dict[int, torch.Tensor]) -> float:
    """Clip the gradients' total norm, let AdamW update every weight, and record for each weight
    its update (new - old) and the moments AdamW keeps. Returns the norm before clipping.
    `before`: a copy of the weights, made once and rewritten each step (a copy made anew at every
    step fragments the heap: the process grew by ~85 MB a step), only while a trace listens."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf")))
    listening = active()
    if listening:
        for p in params:
            before.setdefault(id(p), torch.empty_like(p)).copy_(p.detach())
    optimizer.step()
    # The fused step writes the weights without telling autograd: their version says they changed.
    torch.autograd.graph.increment_version(params)
    if listening:  # old - new, negated in place: exactly new - old, with no new memory
        _record_at_weights(places, update_name, lambda w: before[id(w)].sub_(w.detach()).neg_())
        for what in ADAMW_STATE:
            _record_at_weights(places, lambda name: update_name(name, what), lambda w: optimizer.state[w][what])
    return norm


def train(model: Model, token_ids: list[int], setup: TrainingSetup,
          on_step=None) -> list[StepResult]:
    """`setup.steps` steps of AdamW on `model`'s own weights (changed in memory, never on disk), each
    on the next batch of the stream `token_ids`. `on_step(step, result)` after each."""
    offsets = batch_offsets(len(token_ids), setup, model.config.max_seq_len)
    if model.device.type == "meta":
        raise UserError("training needs the weights' values: a shapes-only model has none")
    ids = record(2, "token ids", torch.tensor(token_ids, dtype=torch.long, device=model.device))  # (N)
    tokens = record(2, "tokens", ids)  # (N): the stream needs no padding, nothing is generated into it
    places = weight_places(model.weights)
    params = parameters(model.weights)
    # Stored row by row for training (a step took 15-25% longer on the tall weights stored for decoding,
    # stages.weights.for_decoding), each tensor changed in place: whoever holds a weight holds the trained
    # one. The model keeps them so, and decodes a little slower after.
    with torch.no_grad():
        for p in params:
            if not p.is_contiguous():
                p.set_(p.contiguous())
    optimizer = torch.optim.AdamW(params, lr=setup.lr, weight_decay=setup.weight_decay, fused=True)
    results, before = [], {}
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for step, offset in enumerate(offsets):
                at(step=step, layer=None)
                loss = forward_loss(model, *cut_batch(tokens, offset, setup.batch, setup.seq))
                loss.backward()
                _record_at_weights(places, grad_name, lambda w: w.grad)
                grad_norm = adamw_step(optimizer, places, setup.clip, before)
                optimizer.zero_grad(set_to_none=True)
                results.append(StepResult(loss.item(), grad_norm, offset))
                if on_step:
                    on_step(step, results[-1])
    finally:
        for p in params:  # the model runs inference again as before
            p.requires_grad_(False)
            p.grad = None
    return results

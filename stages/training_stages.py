"""The 19 stages as a training step shows them (stages.training): the plain registry with a batch
dimension B on every activation, no KV cache (P = 0: the whole sequence at once), the loss at the
end, and beside each tensor the gradient of the loss with respect to it; beside each weight, its
gradient and AdamW's update of it."""
from dataclasses import replace

from .errors import UserError
from .registry import GROUPED, STAGES, Stage, TensorSpec, check, op, spec, spec_in

GRAD, WEIGHT_GRAD, UPDATE = "grad", "weight grad", "update"  # the roles of what the backward pass and AdamW add
TRAINING_ROLES = frozenset({GRAD, WEIGHT_GRAD, UPDATE})
ADAMW_STATE = ("exp_avg", "exp_avg_sq")  # torch's names for AdamW's moments, m and v
# Ids have no gradient, and the loss's own is 1. The head outputs are a view shown beside the merged heads
# (the gradient is heads merged's). The repeated keys and values are one tensor per KV head, multiplied for
# all its query heads (stages.attention.grouped_matmul): their gradient is the sum over those heads, keys.grad.
NO_GRADIENT = frozenset({"tokens[P:P+T]", "targets", "loss", "head outputs"}) | GROUPED


def grad_name(name: str) -> str:
    """The record of ∂loss/∂`name`."""
    return f"{name}.grad"


def update_name(weight: str, what: str = "update") -> str:
    """The record of AdamW's `what` for `weight`: its update (new weight - old weight) or a moment."""
    return f"{weight}.{what}"


def _batched(shape: str) -> str:
    """'(T, H, Dh)' -> '(B, T, H, Dh)'; positions are this batch's own: P = 0, so P+T is T."""
    return "(B, " + shape[1:].replace("P+T", "T")


def _training_spec(t: TensorSpec) -> TensorSpec:
    if t.role == "weight" or t.name in ("freqs_cis", "mask"):
        return replace(t, shape=t.shape.replace("P+T", "T"))
    return replace(t, shape=_batched(t.shape))


def _with_gradients(tensors: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """Each tensor, followed by what the backward pass and the optimizer make of it."""
    out = []
    for t in tensors:
        out.append(t)
        if t.role == "weight":
            out.append(TensorSpec(grad_name(t.name), t.shape, WEIGHT_GRAD))
            out += [TensorSpec(update_name(t.name, what), t.shape, UPDATE) for what in ("update", *ADAMW_STATE)]
        elif t.role != "aux" and t.name not in NO_GRADIENT:
            out.append(TensorSpec(grad_name(t.name), t.shape, GRAD))
    return tuple(out)


_CHANGED = {
    1: dict(explanation="The training text is split into pieces of the model's vocabulary, every piece its id: "
                        "one long stream of N tokens (no chat template: training reads plain text).",
            tensors=(spec("out", "token ids", "(N)"),), ops=(op("tokenize the text", (), "token ids"),)),
    2: dict(explanation="The stream becomes one integer tensor of N ids, from which every step cuts its batch.",
            tensors=(spec_in("token ids", "(N)", 1), spec("out", "tokens", "(N)")),
            ops=(op("copy in", "token ids", "tokens"),)),
    3: dict(short="batch", title="Cutting the batch (in training, in place of looping through sequence length)",
            explanation="No loop over positions: each training step cuts B·T+1 consecutive ids from the stream "
                        "into B rows of T (the inputs: in every row the positions start at P = 0, wherever in the stream the batch was cut) and the same rows shifted by one (the targets: "
                        "position t learns to predict the token at t+1), and runs all B·T positions at once.",
            tensors=(spec_in("tokens", "(N)", 2), spec("out", "tokens[P:P+T]", "(B, T)", "tokens"),
                     spec("out", "targets", "(B, T)", "tokens")),
            ops=(op("B rows of T ids from offset o", "tokens", "tokens[P:P+T]"),
                 op("the same rows, shifted by one", "tokens", "targets"))),
    4: dict(explanation="Embedding lookup: each id of the batch picks its row of the token-embedding matrix. In the "
                        "backward pass only the rows of the ids in the batch get a gradient; every other row's is 0."),
    11: dict(short="no KV cache",
             explanation="Training sees every position of a sequence at once and never comes back for the next "
                         "one, so nothing is cached: the rotated keys and the values of this batch are the keys "
                         "and values that stage 12 reads.",
             tensors=(spec_in("xk (rotated)", "(T, Hkv, Dh)", 10), spec_in("xv (reshaped)", "(T, Hkv, Dh)", 9)),
             ops=(op("no cache: passed on as keys and values", ("xk (rotated)", "xv (reshaped)"), ()),),
             main="xk (rotated)"),
    12: dict(explanation="The keys and values are this batch's own (no cache); each KV head is repeated H/Hkv "
                         "times so every query head has its keys (grouped-query attention: a view, nothing is "
                         "copied); then the head dimension is moved in front of the positions. In the backward "
                         "pass, the gradient of a KV head's keys and values is the sum over the H/Hkv query heads "
                         "that read them.",
             tensors=tuple(replace(t, sources=(10,) if t.name == "keys" else (9,),
                                   view_of="xk (rotated)" if t.name == "keys" else "xv (reshaped)")
                           if t.name in ("keys", "values") else t for t in STAGES[11].tensors),
             # (the batch comes first: the heads and the positions are dimensions 1 and 2)
             ops=tuple(replace(o, label="transpose(1, 2)") if o.label == "transpose(0, 1)" else o
                       for o in STAGES[11].ops)),
    13: dict(explanation="Every query is compared with every key of its own sequence: xq · keysᵀ / sqrt(Dh), plus the "
                         "causal mask (0 where allowed, -inf for later positions: no position may see the token it "
                         "must predict), then a softmax over the keys, in float32. In the backward pass the "
                         "softmax's gradient is 0 where the mask put -inf."),
    19: dict(explanation="The last block's output goes through the final RMSNorm, and every position (not only "
                         "the last) is mapped onto the vocabulary, in float32. log_softmax gives each position's "
                         "log-probabilities; the loss of a position is minus the log-probability of its target "
                         "(cross-entropy), and the step's loss is their mean. With tied embeddings, output is "
                         "tok_embeddings: its gradient is the sum of both uses.",
             tensors=(spec_in("out", "(T, D)", 18, view_of="out"), spec("weight", "norm", "(D)"),
                      spec("mid", "normalized out", "(T, D)"), spec("weight", "output", "(V, D)"),
                      spec("mid", "logits", "(T, V)"), spec_in("targets", "(B, T)", 3),
                      spec("mid", "log probs", "(T, V)"), spec("mid", "token losses", "(T)"),
                      spec("out", "loss", "()")),
             ops=(op("RMSNorm", ("out", "norm"), "normalized out"),
                  op("every row · outputᵀ, float32", ("normalized out", "output"), "logits"),
                  op("log_softmax", "logits", "log probs"),
                  op("−log p(target)", ("log probs", "targets"), "token losses"),
                  op("mean", "token losses", "loss")), main="token losses"),
}


def _training_stage(s: Stage) -> Stage:
    s = replace(s, **_CHANGED.get(s.number, {}))
    if s.number <= 3:  # told whole above
        return s
    # The targets' shape is written with its B already; the loss is one number.
    tensors = tuple(t if "B" in t.shape or t.shape == "()" else _training_spec(t) for t in s.tensors)
    return replace(s, tensors=_with_gradients(tensors) if s.number >= 4 else tensors)


TRAINING_STAGES = check(tuple(_training_stage(s) for s in STAGES))


def check_has_gradient(stage: int) -> None:
    """A stage whose tensors are all token ids has no gradient to picture."""
    if not any(t.role == GRAD for t in TRAINING_STAGES[stage - 1].tensors):
        raise UserError(f"stage {stage} has no gradient to show (its tensors are token ids): try a stage from 4 to 19")

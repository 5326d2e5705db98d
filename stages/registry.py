"""The 19 stages of the "LLaMA Nuts and Bolts" diagrams: the one list that the
CLI, the drawings and the notebooks read.

Each stage names, in the order the forward pass produces them, the tensors it
shows, with their symbolic shapes in the notation of `stages.config`
(S is the length of the whole run: prompt plus room to generate).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: str  # symbolic, e.g. "(T, H, Dh)"
    role: str  # "in" (from the stage before), "weight", "aux" (made for this step), "mid" or "out"
    # The tensor whose memory this one shows again (reshaped, or the very same tensor): a tensor
    # of this stage, else the latest earlier stage's (for stage 7, stage 14's; "out" is the
    # block output of the layer before), else a memory block shared by all steps.
    view_of: str | None = None
    # For an input: the stages that make it (stage 5's x: the embeddings, or the block before), and
    # whether it is the residual stream arriving past the module in between (the skip arrows).
    sources: tuple[int, ...] = ()
    residual: bool = False
    # A query or key tensor: its last axis holds each head's Dh numbers in the order of the pipeline's
    # RoPE layout (interleaved pairs, or rotate-half halves), so that two pipelines' copies are equal
    # after one is reordered (stages.rope.reorder).
    rope_ordered: bool = False
    grouped: bool = False  # see GROUPED


@dataclass(frozen=True)
class Op:
    """One operation of a stage, as an arrow of its diagram: inputs -> label -> outputs."""
    label: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    number: int
    title: str  # exactly as the diagram names it
    short: str  # a few words, for tables
    scope: str  # "run" (once), "step" (once per step) or "layer" (once per layer per step)
    explanation: str
    tensors: tuple[TensorSpec, ...]
    ops: tuple[Op, ...]
    main: str  # the tensor that pictures of this stage focus on
    inner: range | None = None  # the stages this one shows as a single box (stage 7: the attention module)

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"stage {self.number} shows no tensor named {name!r}")


def spec(role: str, name: str, shape: str, view_of: str | None = None) -> TensorSpec:
    return TensorSpec(name, shape, role, view_of, rope_ordered=name in ROPE_ORDERED, grouped=name in GROUPED)


def spec_in(name: str, shape: str, *sources: int, view_of: str | None = None, residual: bool = False) -> TensorSpec:
    return TensorSpec(name, shape, "in", view_of, sources, residual, rope_ordered=name in ROPE_ORDERED,
                      grouped=name in GROUPED)


def _names(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else names


def op(label: str, inputs: str | tuple[str, ...], outputs: str | tuple[str, ...]) -> Op:
    return Op(label, _names(inputs), _names(outputs))


# Held grouped by KV head, (..., Hkv, n_rep, ...) with n_rep on a zero stride, and shown as (..., H, ...):
# the keys and values that grouped-query attention repeats without copying (stages.attention).
GROUPED = frozenset({"keys (repeated)", "values (repeated)", "keys (transposed)", "values (transposed)"})
# The query and key tensors from their projection to the scores (see TensorSpec.rope_ordered).
ROPE_ORDERED = frozenset({"xq", "xk", "xq (reshaped)", "xk (reshaped)", "xq (rotated)", "xk (rotated)", "cache_k",
                          "keys", "keys (repeated)", "xq (transposed)", "keys (transposed)"})

STAGES: tuple[Stage, ...] = (
    Stage(1, "Tokenization", "tokenize", "run",
          "The prompt (after the chat template) is split into pieces of the model's own "
          "vocabulary and each piece becomes its id.",
          (spec("out", "token ids", "(T0)"),),
          (op("tokenize the prompt", (), "token ids"),), "token ids"),
    Stage(2, "Creating tokens tensor", "tokens tensor", "run",
          "The ids go into one integer tensor sized for the whole run (prompt plus room for "
          "the new tokens); the free places hold the padding id until they are generated.",
          (spec_in("token ids", "(T0)", 1), spec("out", "tokens", "(S)")),
          (op("copy in, pad to S", "token ids", "tokens"),), "tokens"),
    Stage(3, "Looping through sequence length", "sequence loop", "step",
          "The generation loop. Step 0 feeds the whole prompt at once (prefill, P = 0); every "
          "later step feeds only the token chosen by the step before (decode, P grows by 1).",
          (spec_in("tokens", "(S)", 2), spec("out", "tokens[P:P+T]", "(T)", "tokens")),
          (op("slice P:P+T", "tokens", "tokens[P:P+T]"),), "tokens[P:P+T]"),
    Stage(4, "Creating inputTensor", "input tensor", "step",
          "Embedding lookup: each id picks its row of the token-embedding matrix.",
          (spec_in("tokens[P:P+T]", "(T)", 3), spec("weight", "tok_embeddings", "(V, D)"),
           spec("out", "x", "(T, D)")),
          (op("look up rows", ("tokens[P:P+T]", "tok_embeddings"), "x"),), "x"),
    Stage(5, "Forward Pass Through Each Transformer Block", "block loop", "layer",
          "The L transformer blocks run one after the other; block i's output is block i+1's "
          "input.",
          (spec_in("x", "(T, D)", 4, 18, view_of="out"),),
          (op("through block 0, 1, ..., L-1", "x", ()),), "x"),
    Stage(6, "Forward Pass Through Attention Pre-normalization", "attention pre-norm", "layer",
          "RMSNorm: each row is divided by its root mean square (plus eps), then scaled "
          "element-wise by the learned attention_norm weight.",
          (spec_in("x", "(T, D)", 5), spec("weight", "attention_norm", "(D)"),
           spec("out", "normalized x", "(T, D)")),
          (op("RMSNorm", ("x", "attention_norm"), "normalized x"),), "normalized x"),
    Stage(7, "Forward Pass Through Attention Module", "attention module", "layer",
          "Multi-head self-attention as one box: stages 8 to 14.",
          (spec_in("normalized x", "(T, D)", 6), spec("out", "attention output", "(T, D)", "attention output")),
          (op("stages 8 to 14", "normalized x", "attention output"),), "attention output", inner=range(8, 15)),
    Stage(8, "Forward Pass Through Attention Module - Calculating xq, xk, and xv", "xq, xk, xv",
          "layer",
          "Three linear maps (x · Wᵀ) give the queries, keys and values. With grouped-query "
          "attention the keys and values have fewer heads (Hkv) than the queries (H).",
          (spec_in("normalized x", "(T, D)", 6), spec("weight", "wq", "(H·Dh, D)"),
           spec("weight", "wk", "(Hkv·Dh, D)"), spec("weight", "wv", "(Hkv·Dh, D)"),
           spec("out", "xq", "(T, H·Dh)"), spec("out", "xk", "(T, Hkv·Dh)"),
           spec("out", "xv", "(T, Hkv·Dh)")),
          (op("x · wqᵀ", ("normalized x", "wq"), "xq"), op("x · wkᵀ", ("normalized x", "wk"), "xk"),
           op("x · wvᵀ", ("normalized x", "wv"), "xv")), "xq"),
    Stage(9, "Forward Pass Through Attention Module - Do reshapings", "reshapes", "layer",
          "The last dimension is split into heads: no number changes, only the shape.",
          (spec_in("xq", "(T, H·Dh)", 8), spec_in("xk", "(T, Hkv·Dh)", 8), spec_in("xv", "(T, Hkv·Dh)", 8),
           spec("out", "xq (reshaped)", "(T, H, Dh)", "xq"), spec("out", "xk (reshaped)", "(T, Hkv, Dh)", "xk"),
           spec("out", "xv (reshaped)", "(T, Hkv, Dh)", "xv")),
          (op("view as heads", "xq", "xq (reshaped)"), op("view as heads", "xk", "xk (reshaped)"),
           op("view as heads", "xv", "xv (reshaped)")), "xq (reshaped)"),
    Stage(10, "Forward Pass Through Attention Module - Apply Rotary Embeddings", "rotary", "layer",
          "RoPE, interleaved-pair layout (Meta and GGUF weights): each adjacent pair "
          "(x[2i], x[2i+1]) of every query and key head is read as a complex number and "
          "multiplied by freqs_cis = exp(j·pos·θ_i), i.e. rotated by the angle pos·θ_i. "
          "Values are not rotated.",
          (spec_in("xq (reshaped)", "(T, H, Dh)", 9), spec_in("xk (reshaped)", "(T, Hkv, Dh)", 9),
           spec("aux", "freqs_cis", "(T, Dh/2)"),
           spec("mid", "xq (pairs)", "(T, H, Dh/2, 2)", "xq (reshaped)"),
           spec("mid", "xq (complex)", "(T, H, Dh/2)", "xq (pairs)"),
           spec("out", "xq (rotated)", "(T, H, Dh)"),
           spec("mid", "xk (pairs)", "(T, Hkv, Dh/2, 2)", "xk (reshaped)"),
           spec("mid", "xk (complex)", "(T, Hkv, Dh/2)", "xk (pairs)"),
           spec("out", "xk (rotated)", "(T, Hkv, Dh)")),
          (op("reshape into pairs", "xq (reshaped)", "xq (pairs)"), op("as complex", "xq (pairs)", "xq (complex)"),
           op("× freqs_cis, back to real", ("xq (complex)", "freqs_cis"), "xq (rotated)"),
           op("reshape into pairs", "xk (reshaped)", "xk (pairs)"), op("as complex", "xk (pairs)", "xk (complex)"),
           op("× freqs_cis, back to real", ("xk (complex)", "freqs_cis"), "xk (rotated)")), "xq (rotated)"),
    Stage(11, "Forward Pass Through Attention Module - Update KV cache", "KV cache", "layer",
          "The rotated keys and the values of the new positions P..P+T-1 are written into "
          "this layer's cache; the cache now holds every position seen so far.",
          (spec_in("xk (rotated)", "(T, Hkv, Dh)", 10), spec_in("xv (reshaped)", "(T, Hkv, Dh)", 9),
           spec("out", "cache_k", "(P+T, Hkv, Dh)", "the cache (S, Hkv, Dh)"),
           spec("out", "cache_v", "(P+T, Hkv, Dh)", "the cache (S, Hkv, Dh)")),
          (op("write rows P..P+T-1", "xk (rotated)", "cache_k"),
           op("write rows P..P+T-1", "xv (reshaped)", "cache_v")), "cache_k"),
    Stage(12, "Forward Pass Through Attention Module - Do transposes", "transposes", "layer",
          "Keys and values of all cached positions are read back; each KV head is repeated "
          "H/Hkv times so every query head has its keys (grouped-query attention: a view, "
          "nothing is copied); then the head dimension is moved to the front.",
          (spec_in("xq (rotated)", "(T, H, Dh)", 10), spec_in("keys", "(P+T, Hkv, Dh)", 11, view_of="cache_k"),
           spec_in("values", "(P+T, Hkv, Dh)", 11, view_of="cache_v"),
           spec("mid", "keys (repeated)", "(P+T, H, Dh)", "keys"),
           spec("mid", "values (repeated)", "(P+T, H, Dh)", "values"),
           spec("out", "xq (transposed)", "(H, T, Dh)", "xq (rotated)"),
           spec("out", "keys (transposed)", "(H, P+T, Dh)", "keys (repeated)"),
           spec("out", "values (transposed)", "(H, P+T, Dh)", "values (repeated)")),
          (op("transpose(0, 1)", "xq (rotated)", "xq (transposed)"),
           op("repeat each KV head H/Hkv times", "keys", "keys (repeated)"),
           op("transpose(0, 1)", "keys (repeated)", "keys (transposed)"),
           op("repeat each KV head H/Hkv times", "values", "values (repeated)"),
           op("transpose(0, 1)", "values (repeated)", "values (transposed)")), "keys (transposed)"),
    Stage(13, "Forward Pass Through Attention Module - Calculate scores", "scores", "layer",
          "Every query is compared with every cached key: xq · keysᵀ / sqrt(Dh), plus the causal "
          "mask (0 where allowed, -inf for future positions; not needed when T = 1), then a "
          "softmax over the keys, in float32.",
          (spec_in("xq (transposed)", "(H, T, Dh)", 12), spec_in("keys (transposed)", "(H, P+T, Dh)", 12),
           spec("aux", "mask", "(T, P+T)"), spec("mid", "scores", "(H, T, P+T)"),
           spec("out", "scores (softmax)", "(H, T, P+T)")),
          (op("xq · keysᵀ / √Dh + mask", ("xq (transposed)", "keys (transposed)", "mask"), "scores"),
           op("softmax (float32)", "scores", "scores (softmax)")), "scores (softmax)"),
    Stage(14, "Forward Pass Through Attention Module - Calculate output", "attention output", "layer",
          "The softmax weights mix the values; the heads are put side by side again and the "
          "linear map wo brings them back to the model dimension.",
          (spec_in("scores (softmax)", "(H, T, P+T)", 13), spec_in("values (transposed)", "(H, P+T, Dh)", 12),
           spec("mid", "head outputs", "(H, T, Dh)", "heads merged"),
           spec("mid", "heads merged", "(T, H·Dh)"),
           spec("weight", "wo", "(D, H·Dh)"), spec("out", "attention output", "(T, D)")),
          (op("softmax · values", ("scores (softmax)", "values (transposed)"), "head outputs"),
           op("transpose, merge heads", "head outputs", "heads merged"),
           op("· woᵀ", ("heads merged", "wo"), "attention output")), "attention output"),
    Stage(15, "Add attention module output and current tensor", "residual (attention)", "layer",
          "Residual connection: the attention output is added to the block's input.",
          (spec_in("x", "(T, D)", 5, residual=True), spec_in("attention output", "(T, D)", 14), spec("out", "h", "(T, D)")),
          (op("add", ("x", "attention output"), "h"),), "h"),
    Stage(16, "Forward Pass Through Feed-Forward Pre-normalization", "FFN pre-norm", "layer",
          "RMSNorm again, with the ffn_norm weight.",
          (spec_in("h", "(T, D)", 15), spec("weight", "ffn_norm", "(D)"), spec("out", "normalized h", "(T, D)")),
          (op("RMSNorm", ("h", "ffn_norm"), "normalized h"),), "normalized h"),
    Stage(17, "Forward Pass Through Feed-Forward Module", "FFN (SwiGLU)", "layer",
          "SwiGLU: the gate silu(h · w1ᵀ) multiplies the up projection h · w3ᵀ element-wise, "
          "and w2 maps the product back to the model dimension.",
          (spec_in("normalized h", "(T, D)", 16), spec("weight", "w1", "(F, D)"), spec("weight", "w3", "(F, D)"),
           spec("mid", "gate", "(T, F)"), spec("mid", "up", "(T, F)"), spec("mid", "gate * up", "(T, F)"),
           spec("weight", "w2", "(D, F)"), spec("out", "ffn output", "(T, D)")),
          (op("silu(h · w1ᵀ)", ("normalized h", "w1"), "gate"), op("h · w3ᵀ", ("normalized h", "w3"), "up"),
           op("multiply element-wise", ("gate", "up"), "gate * up"),
           op("· w2ᵀ", ("gate * up", "w2"), "ffn output")), "gate * up"),
    Stage(18, "Add Feed-Forward module output and current tensor", "residual (FFN)", "layer",
          "Residual connection: the FFN output is added to h. The result is the block's output "
          "and the next block's input.",
          (spec_in("h", "(T, D)", 15, residual=True), spec_in("ffn output", "(T, D)", 17), spec("out", "out", "(T, D)")),
          (op("add", ("h", "ffn output"), "out"),), "out"),
    Stage(19, "Forward Pass Through Output of The Transformer", "output head", "step",
          "The last block's output goes through a final RMSNorm; the last row (the newest "
          "position) is mapped onto the vocabulary, in float32, and the next token is picked: "
          "the highest logit (greedy), or a sample after temperature / top-k / top-p.",
          (spec_in("out", "(T, D)", 18, view_of="out"), spec("weight", "norm", "(D)"), spec("mid", "normalized out", "(T, D)"),
           spec("weight", "output", "(V, D)"), spec("out", "logits", "(V)"),
           spec("out", "probs", "(V)"), spec("out", "next token", "()")),
          (op("RMSNorm", ("out", "norm"), "normalized out"),
           op("last row · outputᵀ, float32", ("normalized out", "output"), "logits"),
           op("softmax (temperature, top-k, top-p)", "logits", "probs"),
           op("argmax, or sample", "probs", "next token")), "probs"),
)


NOTATION = (
    ("S", "length of the run: prompt + room for new tokens"),
    ("T0", "prompt tokens"),
    ("T", "tokens fed this step (T0 at the prompt step, 1 when decoding)"),
    ("P", "positions already in the KV cache"),
    ("D", "model dimension"), ("H", "query heads"), ("Hkv", "key/value heads"),
    ("Dh", "head dimension"), ("F", "FFN hidden dimension"), ("V", "vocabulary size"),
    ("B", "sequences in a training batch (train)"), ("N", "tokens of the training text (train)"),
)


def stage(number: int) -> Stage:
    return STAGES[number - 1]


def readers(stages: tuple[Stage, ...], number: int, name: str) -> tuple[tuple[Stage, TensorSpec], ...]:
    """Where tensor `name` of stage `number` goes: the inputs of later stages that it becomes
    (a stage drawn as one box hands on what its last inner stage makes)."""
    inner = stages[number - 1].inner
    maker = inner[-1] if inner else number
    return tuple((s, t) for s in stages for t in s.tensors if maker in t.sources and name in (t.name, t.view_of))


def check(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """`stages`, if they are the 19 in order and every op and main tensor names a tensor its stage shows."""
    assert [s.number for s in stages] == list(range(1, 20))
    for s in stages:
        assert {n for o in s.ops for n in o.inputs + o.outputs} | {s.main} <= {t.name for t in s.tensors}, s.number
    return stages


check(STAGES)

"""The tensors that code outside the stage functions reads by name (the renderers, the reference,
the tests): one constant each, checked against the registry on import, so that a tensor renamed
in the registry fails here at once instead of in a figure."""
from typing import NamedTuple

from .registry import STAGES


class TensorId(NamedTuple):
    """A tensor as a stage shows it: `trace.values(*SCORES, step=0, layer=3)`."""
    stage: int
    name: str


EMBEDDINGS = TensorId(4, "x")
ATTENTION_NORMED = TensorId(6, "normalized x")
ATTENTION_MODULE_OUTPUT = TensorId(7, "attention output")
XQ, XK, XV = TensorId(8, "xq"), TensorId(8, "xk"), TensorId(8, "xv")
FREQS_CIS = TensorId(10, "freqs_cis")
XQ_ROTATED, XK_ROTATED = TensorId(10, "xq (rotated)"), TensorId(10, "xk (rotated)")
CACHE_K, CACHE_V = TensorId(11, "cache_k"), TensorId(11, "cache_v")
KEYS, KEYS_REPEATED = TensorId(12, "keys"), TensorId(12, "keys (repeated)")
KEYS_TRANSPOSED, VALUES_TRANSPOSED = TensorId(12, "keys (transposed)"), TensorId(12, "values (transposed)")
SCORES, ATTENTION_WEIGHTS = TensorId(13, "scores"), TensorId(13, "scores (softmax)")
HEAD_OUTPUTS, HEADS_MERGED = TensorId(14, "head outputs"), TensorId(14, "heads merged")
ATTENTION_OUTPUT = TensorId(14, "attention output")
STREAM_READ, ATTENTION_ADDED = TensorId(15, "x"), TensorId(15, "attention output")
STREAM_AFTER_ATTENTION = TensorId(15, "h")
FFN_NORMED = TensorId(16, "normalized h")
GATE, UP, GATED = TensorId(17, "gate"), TensorId(17, "up"), TensorId(17, "gate * up")
FFN_OUTPUT = TensorId(17, "ffn output")
FFN_ADDED, BLOCK_OUTPUT = TensorId(18, "ffn output"), TensorId(18, "out")
FINAL_NORMED, LOGITS = TensorId(19, "normalized out"), TensorId(19, "logits")
NEXT_TOKEN_PROBS, NEXT_TOKEN = TensorId(19, "probs"), TensorId(19, "next token")

for _id in [value for value in list(globals().values()) if isinstance(value, TensorId)]:
    STAGES[_id.stage - 1].spec(_id.name)  # KeyError on import if the registry shows no such tensor

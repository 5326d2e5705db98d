"""The 19 stages as the serving engine's layers (stages.packed) show them: the plain registry,
with the stages whose tensors or operations differ told anew."""
from dataclasses import replace

from .registry import STAGES, check, op, spec, spec_in

_ROTATE_HALF = ("RoPE, rotate-half layout (Hugging Face and serving engines: wq and wk rows in Hugging "
                "Face's order): pair i of a head is (x[i], x[i+Dh/2]), and x·cos + rotate_half(x)·sin "
                "turns it by the angle pos·θ_i; cos and sin hold each pair's angle twice. The same "
                "rotation as the interleaved pairs of the plain stages, on the same numbers in another "
                "order. Values are not rotated.")

_CHANGED = {
    5: dict(explanation="The L decoder layers run one after the other. The residual stream is carried "
                        "beside the hidden state, and each addition happens inside the RMSNorm that follows it "
                        "(stage 18 of a layer is one kernel with stage 6 of the next)."),
    6: dict(explanation="RMSNorm with the attention_norm weight (vLLM's input_layernorm). In layer 0 a plain "
                        "RMSNorm of the embeddings; in every later layer one fused kernel with the residual "
                        "addition of the layer before (its stage 18).",
            ops=(op("RMSNorm (after layer 0: fused with stage 18's add)", ("x", "attention_norm"), "normalized x"),)),
    8: dict(explanation="One linear map with the packed weight qkv_proj (wq, wk and wv stacked, rows in that "
                        "order) gives queries, keys and values side by side; they are split into xq, xk and xv, "
                        "views of the one result. wq and wk rows are in rotate-half order.",
            tensors=(spec_in("normalized x", "(T, D)", 6), spec("weight", "qkv_proj", "((H+2·Hkv)·Dh, D)"),
                     spec("mid", "qkv", "(T, (H+2·Hkv)·Dh)"), spec("out", "xq", "(T, H·Dh)", "qkv"),
                     spec("out", "xk", "(T, Hkv·Dh)", "qkv"), spec("out", "xv", "(T, Hkv·Dh)", "qkv")),
            ops=(op("x · qkv_projᵀ (one matmul)", ("normalized x", "qkv_proj"), "qkv"),
                 op("split [H·Dh, Hkv·Dh, Hkv·Dh]", "qkv", ("xq", "xk", "xv"))), main="qkv"),
    10: dict(explanation=_ROTATE_HALF,
             tensors=(spec_in("xq (reshaped)", "(T, H, Dh)", 9), spec_in("xk (reshaped)", "(T, Hkv, Dh)", 9),
                      spec("aux", "cos", "(T, Dh)"), spec("aux", "sin", "(T, Dh)"),
                      spec("mid", "xq (rotate_half)", "(T, H, Dh)"), spec("out", "xq (rotated)", "(T, H, Dh)"),
                      spec("mid", "xk (rotate_half)", "(T, Hkv, Dh)"), spec("out", "xk (rotated)", "(T, Hkv, Dh)")),
             ops=(op("(-x[Dh/2:], x[:Dh/2])", "xq (reshaped)", "xq (rotate_half)"),
                  op("x·cos + rotate_half(x)·sin", ("xq (reshaped)", "xq (rotate_half)", "cos", "sin"), "xq (rotated)"),
                  op("(-x[Dh/2:], x[:Dh/2])", "xk (reshaped)", "xk (rotate_half)"),
                  op("x·cos + rotate_half(x)·sin", ("xk (reshaped)", "xk (rotate_half)", "cos", "sin"), "xk (rotated)"))),
    15: dict(explanation="Residual connection, fused: one kernel adds the attention output to the residual "
                         "stream and normalises the sum (stage 16).",
             ops=(op("add (one kernel with stage 16)", ("x", "attention output"), "h"),)),
    16: dict(explanation="RMSNorm with the ffn_norm weight (vLLM's post_attention_layernorm), in the same "
                         "kernel as stage 15's addition.",
             ops=(op("RMSNorm (one kernel with stage 15)", ("h", "ffn_norm"), "normalized h"),)),
    17: dict(explanation="SwiGLU with the packed weight gate_up_proj (w1 and w3 stacked): one linear map gives "
                         "gate and up side by side, and SiluAndMul takes silu(first half) · second half; w2 "
                         "maps the product back to the model dimension.",
             tensors=(spec_in("normalized h", "(T, D)", 16), spec("weight", "gate_up_proj", "(2·F, D)"),
                      spec("mid", "gate_up", "(T, 2·F)"), spec("mid", "gate * up", "(T, F)"),
                      spec("weight", "w2", "(D, F)"), spec("out", "ffn output", "(T, D)")),
             ops=(op("h · gate_up_projᵀ (one matmul)", ("normalized h", "gate_up_proj"), "gate_up"),
                  op("SiluAndMul", "gate_up", "gate * up"),
                  op("· w2ᵀ", ("gate * up", "w2"), "ffn output"))),
    18: dict(explanation="Residual connection, fused: the FFN output is added to the residual stream inside "
                         "the next RMSNorm's kernel (stage 6 of the next layer, or stage 19's final norm).",
             ops=(op("add (one kernel with the next RMSNorm)", ("h", "ffn output"), "out"),)),
    19: dict(ops=(op("RMSNorm (fused with the last stage 18's add)", ("out", "norm"), "normalized out"),
                  *STAGES[18].ops[1:])),
}

PACKED_STAGES = check(tuple(replace(s, **_CHANGED.get(s.number, {})) for s in STAGES))

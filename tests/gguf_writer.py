"""GGUF files of every common tensor type, for the tests: an existing file rewritten as llama.cpp's
llama-quantize does (the same metadata, the 2-D weight matrices stored in another type, the norm
vectors left in F32), and the Llama 3.1 RoPE divisors as llama.cpp's converter writes them.

The `gguf` package quantizes F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 itself; the K-quants it only
reads, so they are encoded here: plain round-to-nearest with one scale per block of 256 and a 6- or
4-bit scale per sub-block (llama.cpp searches for better scales; any valid bytes do for a reader).
Each K-quant's block layout, in bytes, is spelled out next to its encoder.
"""
import math
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
QK_K = 256  # values in one K-quant block


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b is 0 (a sub-block of zeros, or a scale that rounded to 0)."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape, np.float32), where=b != 0)


def _affine(blocks: np.ndarray, sub: int, q_max: int, scale_max: int):
    """x ≈ d·sc·q − dmin·m in each sub-block of `sub` values; q in 0..q_max, sc and m in 0..scale_max.
    blocks (n, 256) -> d, dmin (n) float16; sc, m (n, 256/sub) and q (n, 256/sub, sub) uint8."""
    x = blocks.reshape(len(blocks), -1, sub)  # (n, subs, sub)
    low, high = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)  # (n, subs)
    step = (high - low) / q_max
    d = (step.max(-1) / scale_max).astype(np.float16)
    dmin = ((-low).max(-1) / scale_max).astype(np.float16)
    d32, dmin32 = d[:, None].astype(np.float32), dmin[:, None].astype(np.float32)  # (n, 1), as the reader sees them
    sc = _divide(step, d32).round().clip(0, scale_max)
    m = _divide(-low, dmin32).round().clip(0, scale_max)
    q = _divide(x + (dmin32 * m)[..., None], (d32 * sc)[..., None]).round().clip(0, q_max)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _symmetric(blocks: np.ndarray, sub: int, q_max: int, scale_max: int):
    """x ≈ d·sc·q in each sub-block of `sub` values; q in −q_max..q_max, sc in 0..scale_max.
    blocks (n, 256) -> d (n) float16; sc (n, 256/sub) and q (n, 256/sub, sub) int8."""
    x = blocks.reshape(len(blocks), -1, sub)  # (n, subs, sub)
    step = np.abs(x).max(-1) / q_max  # (n, subs)
    d = (step.max(-1) / scale_max).astype(np.float16)
    d32 = d[:, None].astype(np.float32)  # (n, 1), as the reader sees it
    sc = _divide(step, d32).round().clip(0, scale_max)
    q = _divide(x, (d32 * sc)[..., None]).round().clip(-q_max, q_max)
    return d, sc.astype(np.int8), q.astype(np.int8)


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """Pack along axis 1: out = Σ_s values[:, s] << (width·s), as uint8."""
    return sum(values[:, s].astype(np.uint8) << np.uint8(width * s) for s in range(values.shape[1])).astype(np.uint8)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's twelve scale bytes from eight 6-bit scales and mins: bytes 0-3 hold sc[0..3] and the
    top two bits of sc[4..7], bytes 4-7 the same for m, bytes 8-11 the low nibbles of sc[4..7], m[4..7]."""
    return np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                           (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], axis=1)


def _q2_k(blocks):  # scales (16: sc | m<<4), qs (64: 2-bit q), d, dmin = 84 bytes
    n = len(blocks)
    d, dmin, sc, m, q = _affine(blocks, 16, 3, 15)
    qs = _bits(q.reshape(n, 2, 4, 32).transpose(0, 2, 1, 3), 2).reshape(n, 64)  # value 128h+32s+k: byte 32h+k, bits 2s
    return np.concatenate([sc | m << 4, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q3_k(blocks):  # hmask (32), qs (64: low 2 bits of q+4), scales (12: 6-bit sc+32), d = 110 bytes
    n = len(blocks)
    d, sc, q = _symmetric(blocks, 16, 3, 31)
    high = (q >= 0).astype(np.uint8)  # the format subtracts 4 where this bit is 0
    low = (q.astype(np.int16) & 3).astype(np.uint8)  # q + 4·(1 − high)
    hmask = _bits(high.reshape(n, 8, 32), 1)  # value 32b+k: byte k, bit b
    qs = _bits(low.reshape(n, 2, 4, 32).transpose(0, 2, 1, 3), 2).reshape(n, 64)
    u = (sc.astype(np.int16) + 32).astype(np.uint8)  # (n, 16) in 32..63
    scales = np.concatenate([(u[:, :8] & 0xF) | (u[:, 8:] & 0xF) << 4,  # scale j: low nibble in byte j mod 8
                             _bits((u >> 4).reshape(n, 4, 4), 2)], axis=1)  # scale 4s+i: bits 2s of byte 8+i
    return np.concatenate([hmask, qs, scales, _f16_bytes(d)], axis=1)


def _q4_k(blocks):  # d, dmin, scales (12), qs (128: sub-blocks 2c and 2c+1 in low and high nibbles) = 144 bytes
    n = len(blocks)
    d, dmin, sc, m, q = _affine(blocks, 32, 15, 63)
    qs = (q[:, 0::2] | q[:, 1::2] << 4).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, m), qs], axis=1)


def _q5_k(blocks):  # d, dmin, scales (12), qh (32: fifth bits), qs (128: low nibbles as Q4_K) = 176 bytes
    n = len(blocks)
    d, dmin, sc, m, q = _affine(blocks, 32, 31, 63)
    low = q & 0xF
    qh = _bits(q >> 4, 1)  # value 32i+k: byte k, bit i
    qs = (low[:, 0::2] | low[:, 1::2] << 4).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales(sc, m), qh, qs], axis=1)


def _q6_k(blocks):  # ql (128: low nibbles), qh (64: high 2 bits), scales (16 int8), d = 210 bytes
    n = len(blocks)
    d, sc, q = _symmetric(blocks, 16, 31, 127)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, 2, 2, 64)  # value 128h+64s+j
    low, high = u & 0xF, (u >> 4).reshape(n, 2, 4, 32)  # high: value 128h+32s+k
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(n, 128)  # byte 64h+j: nibble s
    qh = _bits(high.transpose(0, 2, 1, 3), 2).reshape(n, 64)  # byte 32h+k: bits 2s
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


K_QUANTS = {Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """A float32 matrix (rows, cols) as `qtype` stores it: the floats themselves for F32 and F16,
    else uint8 (rows, bytes per row), ready for GGUFWriter.add_tensor(..., raw_dtype=qtype)."""
    values = np.ascontiguousarray(values, np.float32)
    if qtype not in K_QUANTS:
        return gguf.quants.quantize(values, qtype)
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} values, not {cols}")
    encoded = K_QUANTS[qtype](values.reshape(-1, QK_K))
    assert encoded.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(encoded.reshape(rows, -1))


def rewrite_gguf(source: Path, path: Path, qtype: Q = Q.F32,
                 tensors: dict[str, np.ndarray | None] | None = None) -> Path:
    """`source`'s metadata and tensors at `path`, its 2-D tensors stored as `qtype`. `tensors` replaces
    (an array, written as it is) or drops (None) tensors by name; names new to the file are added."""
    tensors = dict(tensors or {})
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes these itself
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for t in reader.tensors:
        if t.name in tensors:
            if tensors[t.name] is not None:
                writer.add_tensor(t.name, tensors[t.name])
            del tensors[t.name]
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        data = encode(values, qtype) if values.ndim == 2 else values.astype(np.float32)
        writer.add_tensor(t.name, data, raw_dtype=qtype if values.ndim == 2 else None)
    for name, value in tensors.items():
        if value is not None:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def set_type_id(path: Path, tensor_name: str, type_id: int) -> None:
    """Overwrite the type id in one tensor's header entry (name, n_dims, dims, type, offset), in place."""
    data = bytearray(path.read_bytes())
    name = tensor_name.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def llamacpp_rope_freqs(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context: int) -> np.ndarray:
    """rope_freqs.weight (Dh/2) float32 as llama.cpp's converter computes it from a llama3 rope_scaling,
    pair by pair from each rotation's wavelength: 1 below original/high_freq_factor positions, `factor`
    above original/low_freq_factor, between them 1 / ((1 − s)/factor + s) with s rising from 0 to 1."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    short, long = original_context / high_freq_factor, original_context / low_freq_factor
    divisors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < short:
            divisors.append(1.0)
        elif wavelength > long:
            divisors.append(factor)
        else:
            s = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            divisors.append(1 / ((1 - s) / factor + s))
    return np.array(divisors, np.float32)

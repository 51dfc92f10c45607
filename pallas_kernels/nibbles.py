"""Packed 4-bit codes -> floating point, inside Pallas-Triton kernels.

A byte holds two codes: c_lo = byte & 0xF, c_hi = byte >> 4. The kernels never convert
an integer to a float; they OR the code into the mantissa of a power of two ("magic"
number) and get `offset + c` exactly, then remove the offset through sums they already
compute (sum(x) for a matmul, the row sums in attention):
  16-bit:  bf16 bits 0x4300 | c = 128 + c,   f16 bits 0x6400 | c = 1024 + c
  f32:     f32 bits 0x43000000 | c << 16 = 128 + c

`asm=True` does this with inline PTX on four bytes (one 32-bit register) at a time:
a PRMT spreads two bytes into the two halves of a register and one LOP3 ((a & b) | c)
masks the code and sets the exponent, so a pair of 16-bit values costs ~1 instruction
per code instead of the ~3 (widen, and/shift, or) of the jnp formulation, which is what
`asm=False` and interpret mode run (same bits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:  # only needed on GPU
    from jax.experimental.pallas import triton as _plgpu
except Exception:  # pragma: no cover
    _plgpu = None


def ptx_available() -> bool:
    """Whether the default device compiles inline PTX (an NVIDIA GPU; not ROCm, not CPU)."""
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and "rocm" not in str(getattr(dev.client, "platform_version", "")).lower()
    except Exception:  # pragma: no cover
        return False


MAGIC16 = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}
MAGIC_F32 = (0x43000000, 128.0)
CENTER = 8  # centered codes: code - 8 in [-8, 7]


def _pair_bits(v: float, dtype) -> int:
    """v as a 16-bit float of dtype, twice in one 32-bit word (a packed bf16x2 / f16x2 operand)."""
    half = int(np.asarray(v, dtype).view(np.uint16))
    return half << 16 | half


# per dtype: the PTX type, and the fma operands 1.0 and -(offset + CENTER) of the centering
_CENTER_FMA = {dt: (kind, _pair_bits(1.0, dt), _pair_bits(-(MAGIC16[dt][1] + CENTER), dt))
               for dt, kind in ((jnp.dtype(jnp.bfloat16), "bf16x2"), (jnp.dtype(jnp.float16), "f16x2"))}
_LOP_AND_OR = "0xEA"  # lop3 truth table of (a & b) | c


def _asm(src: str, p, n_out_regs: int, out_dtype, *more, pack: int = 4):
    """One elementwise_inline_asm over `pack` elements at a time (4 bytes, or 1 uint32 word) with
    one result (Pallas-Triton's lowering takes a single result only, of a signless type):
    $0..$(n-1) are the outputs, $n the word of p (then one word per array in `more`)."""
    out = jax.ShapeDtypeStruct(p.shape, out_dtype)
    args = [p, *more]
    (res,) = _plgpu.elementwise_inline_asm(src, args=args,
                                           constraints=",".join(["=r"] * n_out_regs + ["r"] * len(args)),
                                           pack=pack, result_shape_dtypes=[out])
    return res


def nibbles16(p, dtype, *, asm: bool, centered: bool = False):
    """uint8 p -> (lo, hi) in dtype (bf16 or f16), each `offset + code` (MAGIC16[dtype]), or
    with `centered` exactly `code - CENTER` (one packed fma more per pair of codes). Centered
    codes are for sums accumulated over many tiles before the offset could be removed: a
    common offset of 128 (bf16) or 1024 (f16) per code would dominate such a sum and its
    rounding (measured: draft attention in f16 went from 1e-3 to 2e-2 relative error)."""
    bits, off = MAGIC16[jnp.dtype(dtype)]
    if not asm:
        p16 = p.astype(jnp.uint16)
        lo, hi = (lax.bitcast_convert_type((p16 & 0xF) | bits, dtype),
                  lax.bitcast_convert_type((p16 >> 4) | bits, dtype))
        if centered:  # exact: both are small integers in a 16-bit float
            shift = jnp.asarray(off + CENTER, dtype)
            lo, hi = (lo - shift).astype(dtype), (hi - shift).astype(dtype)
        return lo, hi
    m2 = f"0x{bits:04X}{bits:04X}"
    kind, one, neg = _CENTER_FMA[jnp.dtype(dtype)]

    def codes(shift):
        # $2 = four bytes b0..b3; t0 = [b0, 0, b1, 0], t1 = [b2, 0, b3, 0] (PRMT selector 4 = a zero
        # byte); $0 / $1 = the codes of (b0, b1) / (b2, b3) as two 16-bit floats each.
        sh = f"shr.b32 t0, t0, {shift};\nshr.b32 t1, t1, {shift};" if shift else ""
        if not centered:
            tail = f"""lop3.b32 $0, t0, 0x000F000F, {m2}, {_LOP_AND_OR};
        lop3.b32 $1, t1, 0x000F000F, {m2}, {_LOP_AND_OR};"""
        else:  # x * 1.0 - (offset + CENTER), exact
            tail = f"""lop3.b32 t0, t0, 0x000F000F, {m2}, {_LOP_AND_OR};
        lop3.b32 t1, t1, 0x000F000F, {m2}, {_LOP_AND_OR};
        mov.b32 c1, 0x{one:08X};
        mov.b32 c2, 0x{neg:08X};
        fma.rn.{kind} $0, t0, c1, c2;
        fma.rn.{kind} $1, t1, c1, c2;"""
        return f"""{{
        .reg .b32 z, t0, t1, c1, c2;
        mov.b32 z, 0;
        prmt.b32 t0, $2, z, 0x4140;
        prmt.b32 t1, $2, z, 0x4342;
        {sh}
        {tail}
        }}"""

    lo, hi = (_asm(codes(sh), p, 2, jnp.int16) for sh in (0, 4))
    return lax.bitcast_convert_type(lo, dtype), lax.bitcast_convert_type(hi, dtype)


def nibbles_f32(p, *, asm: bool):
    """uint8 p -> (lo, hi) float32, each 128 + code."""
    bits, _ = MAGIC_F32
    if not asm:
        p32 = p.astype(jnp.uint32)
        return (lax.bitcast_convert_type(((p32 & 0xF) << 16) | bits, jnp.float32),
                lax.bitcast_convert_type(((p32 & 0xF0) << 12) | bits, jnp.float32))
    m = f"0x{bits:08X}"

    def codes(shifts):
        # Byte k of $4 sits at bits 8k..8k+7; its low code must land at bits 16..19 (shift
        # 16 - 8k), its high code too (shift 12 - 8k). $0..$3 = the codes of b0..b3.
        lines = [".reg .b32 t;"]
        for k, sh in enumerate(shifts):
            lines += [sh, f"lop3.b32 ${k}, t, 0x000F0000, {m}, {_LOP_AND_OR};"]
        return "{\n" + "\n".join(lines) + "\n}"

    lo = _asm(codes(("shl.b32 t, $4, 16;", "shl.b32 t, $4, 8;", "mov.b32 t, $4;", "shr.b32 t, $4, 8;")),
              p, 4, jnp.int32)
    hi = _asm(codes(("shl.b32 t, $4, 12;", "shl.b32 t, $4, 4;", "shr.b32 t, $4, 4;", "shr.b32 t, $4, 12;")),
              p, 4, jnp.int32)
    return lax.bitcast_convert_type(lo, jnp.float32), lax.bitcast_convert_type(hi, jnp.float32)


CENTER8 = 128  # centered INT8 codes: code - 128 in [-128, 127]
_F16_MAGIC = MAGIC16[jnp.dtype(jnp.float16)]
_LOP_SELECT = "0xE4"  # lop3 truth table of (a & c) | (b & ~c): bits of a where c is set, else of b


def int8_codes_f16(upper, lower, *, asm: bool):
    """The INT8 code 16U + L of the hierarchical cache's two planes, as float16 `code - 128`
    (exact), for both nibble positions: uint8 upper, lower (same shape) -> (lo, hi) float16, lo
    from the low nibbles (16 (U & 15) + (L & 15)), hi from the high ones ((U & 0xF0) + (L >> 4)).

    float16 is the 16-bit type whose mantissa holds 8 bits: bits 0x6400 | code = 1024 + code, so
    the whole INT8 code becomes a float by bit operations and one exact packed fma that removes
    1024 + 128; bfloat16 (7 mantissa bits) cannot do this. With `asm`, per four bytes of each
    plane: one shift and one LOP3 assemble four codes, two PRMTs put them under the exponent
    byte 0x64, two fma.rn.f16x2 center them (~1.5 instructions per code, against the widening,
    masks, shifts and I2F conversions of the jnp form)."""
    bits, off = _F16_MAGIC
    if not asm:
        u, lw = upper.astype(jnp.uint16), lower.astype(jnp.uint16)
        codes = (((u & 0xF) << 4) | (lw & 0xF), (u & 0xF0) | (lw >> 4))
        shift = jnp.asarray(off + CENTER8, jnp.float16)
        return tuple((lax.bitcast_convert_type(c | bits, jnp.float16) - shift).astype(jnp.float16) for c in codes)
    _, one, _ = _CENTER_FMA[jnp.dtype(jnp.float16)]
    neg = _pair_bits(-(off + CENTER8), jnp.float16)

    def src(assemble):
        # $2 = four bytes of U, $3 = the same four bytes of L; t = the four codes, one per byte;
        # t0 = [code0, 0x64, code1, 0x64] (PRMT selector: bytes 4.. are the constant k).
        return f"""{{
        .reg .b32 t, t0, t1, k, c1, c2;
        {assemble}
        mov.b32 k, 0x{bits >> 8:02X}{bits >> 8:02X}{bits >> 8:02X}{bits >> 8:02X};
        prmt.b32 t0, t, k, 0x5140;
        prmt.b32 t1, t, k, 0x5342;
        mov.b32 c1, 0x{one:08X};
        mov.b32 c2, 0x{neg:08X};
        fma.rn.f16x2 $0, t0, c1, c2;
        fma.rn.f16x2 $1, t1, c1, c2;
        }}"""

    lo = _asm(src(f"shl.b32 t, $2, 4;\n        lop3.b32 t, t, $3, 0xF0F0F0F0, {_LOP_SELECT};"),
              upper, 2, jnp.int16, lower)
    hi = _asm(src(f"shr.b32 t, $3, 4;\n        lop3.b32 t, $2, t, 0xF0F0F0F0, {_LOP_SELECT};"),
              upper, 2, jnp.int16, lower)
    return lax.bitcast_convert_type(lo, jnp.float16), lax.bitcast_convert_type(hi, jnp.float16)


# --------------------------------------------------------------------------------------
# Packed 16-bit dot of one word of codes (the INT4 GEMV's inner product)
# --------------------------------------------------------------------------------------

_ZERO_NEG = 0x80008000  # -0.0 twice: fma(a, b, -0) = a * b rounded, for either 16-bit type


def _halves_f32(word, dtype):
    """uint32 words of two 16-bit floats of dtype -> (low half, high half) as float32."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):  # bf16 bits are the top half of an f32
        return (lax.bitcast_convert_type(word << 16, jnp.float32),
                lax.bitcast_convert_type(word & jnp.uint32(0xFFFF0000), jnp.float32))
    return tuple(lax.bitcast_convert_type((h & 0xFFFF).astype(jnp.uint16), jnp.float16).astype(jnp.float32)
                 for h in (word, word >> 16))


def word_dot16(w, xw, dtype, *, asm: bool):
    """The INT4 GEMV's inner product on packed 16-bit floats: for uint32 words w of four packed
    bytes (b0..b3 little-endian; codes byte & 0xF and byte >> 4) and xw = (lo01, lo23, hi01,
    hi23), uint32 words of two 16-bit floats of dtype each (bf16 or f16: the activations that
    pair with the low codes of bytes (0, 1), (2, 3) and the high codes of (0, 1), (2, 3)),
    -> float32  sum_k (lo_k - 8) x_lo_k + (hi_k - 8) x_hi_k  (codes centered, see CENTER).

    With `asm`, per word: two PRMTs and four LOP3s make the codes (bf16 also two shifts, for the
    high codes), four packed fmas center them (exact), four packed fmas multiply and accumulate:
    the two halves of one 16-bit pair (low: even bytes, high: odd bytes) each sum four products,
    rounded to 16 bits at every step (relative error ~2**-9 for bf16, 2**-11 for f16, far below
    the INT4 weights' own), then become float32 and add. The f32 reduce path spends about twice
    the instructions per code (f32 FMUL + FADD per code: Triton does not contract them, plus a
    shift and a LOP3 per code). Without asm (interpret mode): the same sum in float32."""
    dt = jnp.dtype(dtype)
    if not asm:
        f32 = jnp.float32
        xs = [h for word in xw for h in _halves_f32(word, dt)]  # lo0 lo1 lo2 lo3 hi0 hi1 hi2 hi3
        acc = jnp.zeros(w.shape, f32)
        for k in range(4):
            byte = (w >> (8 * k)) & 0xFF
            acc = acc + ((byte & 0xF).astype(f32) - CENTER) * xs[k] + ((byte >> 4).astype(f32) - CENTER) * xs[4 + k]
        return acc
    bits, off = MAGIC16[dt]
    kind, one, neg_lo = _CENTER_FMA[dt]  # (offset + c) * 1 - (offset + CENTER) = c - CENTER
    m2 = f"0x{bits:04X}{bits:04X}"
    if kind == "bf16x2":  # high codes shifted down to bits 0..3 of each half: offset + code again
        hi_codes = f"""shr.b32 t0, t0, 4;
        shr.b32 t1, t1, 4;
        lop3.b32 u0, t0, 0x000F000F, {m2}, {_LOP_AND_OR};
        lop3.b32 u1, t1, 0x000F000F, {m2}, {_LOP_AND_OR};
        fma.rn.{kind} u0, u0, c1, c2;
        fma.rn.{kind} u1, u1, c1, c2;"""
    else:  # f16: bits 4..7 are mantissa bits, 0x6400 | 16 c = 1024 + 16 c; / 16 - 72 = c - 8
        hi_codes = f"""lop3.b32 u0, t0, 0x00F000F0, {m2}, {_LOP_AND_OR};
        lop3.b32 u1, t1, 0x00F000F0, {m2}, {_LOP_AND_OR};
        mov.b32 c1, 0x{_pair_bits(1.0 / 16.0, dt):08X};
        mov.b32 c2, 0x{_pair_bits(-(off / 16.0 + CENTER), dt):08X};
        fma.rn.{kind} u0, u0, c1, c2;
        fma.rn.{kind} u1, u1, c1, c2;"""
    src = f"""{{
        .reg .b32 z, t0, t1, u0, u1, c1, c2, a;
        mov.b32 z, 0;
        prmt.b32 t0, $1, z, 0x4140;
        prmt.b32 t1, $1, z, 0x4342;
        mov.b32 c1, 0x{one:08X};
        mov.b32 c2, 0x{neg_lo:08X};
        lop3.b32 u0, t0, 0x000F000F, {m2}, {_LOP_AND_OR};
        lop3.b32 u1, t1, 0x000F000F, {m2}, {_LOP_AND_OR};
        fma.rn.{kind} u0, u0, c1, c2;
        fma.rn.{kind} u1, u1, c1, c2;
        mov.b32 a, 0x{_ZERO_NEG:08X};
        fma.rn.{kind} a, u0, $2, a;
        fma.rn.{kind} a, u1, $3, a;
        {hi_codes}
        fma.rn.{kind} a, u0, $4, a;
        fma.rn.{kind} $0, u1, $5, a;
        }}"""
    acc = _asm(src, w, 1, jnp.int32, *xw, pack=1)
    lo, hi = _halves_f32(lax.bitcast_convert_type(acc, jnp.uint32), dt)
    return lo + hi


def mul16_words(a, b, dtype, *, asm: bool):
    """uint32 words of two 16-bit floats: the elementwise product, rounded to dtype, as words
    (the norm weight applied to the activations of the 16-bit GEMV path)."""
    dt = jnp.dtype(dtype)
    if not asm:
        prods = [(x * y).astype(dt) for x, y in zip(_halves_f32(a, dt), _halves_f32(b, dt))]
        lo, hi = (lax.bitcast_convert_type(p, jnp.uint16).astype(jnp.uint32) for p in prods)
        return lo | (hi << 16)
    kind = _CENTER_FMA[dt][0]
    src = f"""{{
        .reg .b32 z;
        mov.b32 z, 0x{_ZERO_NEG:08X};
        fma.rn.{kind} $0, $1, $2, z;
        }}"""
    return lax.bitcast_convert_type(_asm(src, a, 1, jnp.int32, b, pack=1), jnp.uint32)

"""The nibble -> float bit tricks of `pallas_kernels.nibbles`, including their inline PTX.

The PTX cannot run here, so a small interpreter of the instructions it uses (mov, prmt,
lop3, shl, shr on .b32; fma.rn on bf16x2 / f16x2) runs the exact strings the kernels embed, on
every byte value in every lane, and must give the same bits as the jnp formulation that
interpret mode uses. This is what keeps a wrong PRMT selector or LOP3 table out of the
GPU kernels (the GPU check in scripts/bench_kernels.py runs them for real).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax.numpy as jnp
from jax import lax

from pallas_kernels import nibbles

ALL_BYTES = np.arange(256, dtype=np.uint8)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_nibbles16_jnp_gives_offset_plus_code(dtype):
    lo, hi = nibbles.nibbles16(jnp.asarray(ALL_BYTES), dtype, asm=False)
    off = nibbles.MAGIC16[jnp.dtype(dtype)][1]
    np.testing.assert_array_equal(np.asarray(lo, np.float32), off + (ALL_BYTES & 0xF))
    np.testing.assert_array_equal(np.asarray(hi, np.float32), off + (ALL_BYTES >> 4))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_centered_nibbles16_jnp_gives_code_minus_8(dtype):
    lo, hi = nibbles.nibbles16(jnp.asarray(ALL_BYTES), dtype, asm=False, centered=True)
    assert lo.dtype == hi.dtype == dtype
    np.testing.assert_array_equal(np.asarray(lo, np.float32), (ALL_BYTES & 0xF).astype(np.float32) - 8)
    np.testing.assert_array_equal(np.asarray(hi, np.float32), (ALL_BYTES >> 4).astype(np.float32) - 8)


def test_nibbles_f32_jnp_gives_128_plus_code():
    lo, hi = nibbles.nibbles_f32(jnp.asarray(ALL_BYTES), asm=False)
    np.testing.assert_array_equal(np.asarray(lo), 128.0 + (ALL_BYTES & 0xF))
    np.testing.assert_array_equal(np.asarray(hi), 128.0 + (ALL_BYTES >> 4))


# ---------------------------------------------------------------------------------------
# A PTX interpreter for the instructions the unpacking uses (vectorized over uint32 words)
# ---------------------------------------------------------------------------------------

def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = src[s & 7]
        if s & 8:  # sign-replicate mode of the selector
            byte = np.where(byte & 0x80, 0xFF, 0).astype(a.dtype)
        out |= byte << (8 * i)
    return out


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1).astype(a.dtype) << bit
    return out


def _fma16x2(a, b, c, dtype):
    """a * b + c on two 16-bit floats per 32-bit word, rounded once to dtype."""
    out = np.zeros_like(a)
    for shift in (0, 16):
        x = [((w >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.uint16).view(dtype).astype(np.float64)
             for w in (a, b, c)]
        r = np.asarray(x[0] * x[1] + x[2], dtype).view(np.uint16).astype(np.uint64)
        out |= r << np.uint64(shift)
    return out


def run_ptx(src: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `src` on uint32 registers; inputs / outputs are named like the asm ($0, $4, ...)."""
    regs = {k: v.astype(np.uint64) for k, v in inputs.items()}
    mask = np.uint64(0xFFFFFFFF)

    def val(tok):
        tok = tok.strip()
        if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", tok):
            return np.uint64(int(tok, 0))
        return regs[tok]

    for line in src.replace("{", "\n").replace("}", "\n").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        d = args[0]
        if op == "mov.b32":
            regs[d] = val(args[1]) + np.zeros_like(next(iter(inputs.values())), np.uint64)
        elif op == "prmt.b32":
            regs[d] = _prmt(val(args[1]), val(args[2]) + np.zeros_like(val(args[1])), int(val(args[3])))
        elif op == "lop3.b32":
            a = val(args[1])
            regs[d] = _lop3(a, val(args[2]) + np.zeros_like(a), val(args[3]) + np.zeros_like(a), int(val(args[4])))
        elif op == "shl.b32":
            regs[d] = (val(args[1]) << val(args[2])) & mask
        elif op == "shr.b32":
            regs[d] = val(args[1]) >> val(args[2])
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            a, b, c = (val(t) + np.zeros_like(val(args[1])) for t in args[1:4])
            regs[d] = _fma16x2(a, b, c, jnp.bfloat16 if "bf16" in op else np.float16)
        else:
            raise AssertionError(f"unexpected PTX op {op!r} in {line!r}")
    return regs


class _CapturePTX:
    """Stands in for Pallas-Triton: runs each asm with the interpreter, 4 bytes per word,
    using Triton's packing (pack=4: element i of a group in byte i of the input word;
    16-bit results two per output register, low half first; 32-bit one per register)."""

    def __init__(self):
        self.sources = []

    def elementwise_inline_asm(self, src, *, args, constraints, pack, result_shape_dtypes):
        assert pack in (1, 4) and len(result_shape_dtypes) == 1
        assert all(np.shape(a) == np.shape(args[0]) for a in args)
        self.sources.append(src)
        cons = constraints.split(",")
        n_out = sum(c.startswith("=") for c in cons)
        assert cons[n_out:] == ["r"] * len(args)

        def word(a):
            if pack == 1:  # one 32-bit element per register
                assert np.asarray(a).dtype.itemsize == 4
                return np.asarray(a).view(np.uint32).reshape(-1)
            p = np.asarray(a, np.uint8).reshape(-1, 4).astype(np.uint32)
            return p[:, 0] | (p[:, 1] << 8) | (p[:, 2] << 16) | (p[:, 3] << 24)

        regs = run_ptx(src, {f"${n_out + i}": word(a) for i, a in enumerate(args)})
        outs = [regs[f"${j}"].astype(np.uint32) for j in range(n_out)]
        out_dt = np.dtype(result_shape_dtypes[0].dtype)
        if pack == 1:
            assert n_out == 1 and out_dt.itemsize == 4
            return [jnp.asarray(outs[0].view(out_dt).reshape(np.shape(args[0])))]
        if out_dt.itemsize == 2:
            assert n_out == 2
            vals = np.stack([outs[0] & 0xFFFF, outs[0] >> 16, outs[1] & 0xFFFF, outs[1] >> 16], axis=1)
        else:
            assert n_out == 4
            vals = np.stack(outs, axis=1)
        return [jnp.asarray(vals.astype(out_dt).reshape(np.shape(args[0])))]


@pytest.fixture
def fake_triton(monkeypatch):
    cap = _CapturePTX()
    monkeypatch.setattr(nibbles, "_plgpu", cap)
    return cap


def _bytes_in_every_lane():
    """Every byte value at each of the 4 positions of a word: [4 * 256] bytes, shape [64, 16]."""
    words = np.stack([np.roll(ALL_BYTES, s) for s in range(4)], axis=1)  # row v: v, v-1, v-2, v-3
    return jnp.asarray(words.reshape(64, 16))


def _bits(a):
    a = jnp.asarray(a)
    return np.asarray(lax.bitcast_convert_type(a, jnp.uint16 if a.dtype.itemsize == 2 else jnp.uint32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_nibbles16_ptx_matches_jnp(fake_triton, dtype):
    p = _bytes_in_every_lane()
    got = nibbles.nibbles16(p, dtype, asm=True)
    want = nibbles.nibbles16(p, dtype, asm=False)
    assert len(fake_triton.sources) == 2
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(_bits(g), _bits(w))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_centered_nibbles16_ptx_matches_jnp(fake_triton, dtype):
    p = _bytes_in_every_lane()
    got = nibbles.nibbles16(p, dtype, asm=True, centered=True)
    want = nibbles.nibbles16(p, dtype, asm=False, centered=True)
    assert len(fake_triton.sources) == 2 and all("fma.rn" in src for src in fake_triton.sources)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_nibbles_f32_ptx_matches_jnp(fake_triton):
    p = _bytes_in_every_lane()
    got = nibbles.nibbles_f32(p, asm=True)
    want = nibbles.nibbles_f32(p, asm=False)
    assert len(fake_triton.sources) == 2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_interpreter_catches_a_wrong_selector(fake_triton, monkeypatch):
    """The check above can fail: a PRMT selector that swaps two bytes gives other bits."""
    p = _bytes_in_every_lane()
    real = nibbles._asm

    def swapped(src, *a, **k):
        return real(src.replace("0x4140", "0x4041"), *a, **k)

    monkeypatch.setattr(nibbles, "_asm", swapped)
    got, _ = nibbles.nibbles16(p, jnp.bfloat16, asm=True)
    want, _ = nibbles.nibbles16(p, jnp.bfloat16, asm=False)
    assert not np.array_equal(_bits(got), _bits(want))


def _plane_pairs_in_every_lane():
    """Every (upper, lower) byte pair at each of the 4 positions of a word: 4 * 65536 bytes each."""
    u = np.repeat(ALL_BYTES, 256)
    lw = np.tile(ALL_BYTES, 256)
    ups = np.concatenate([np.roll(u, s) for s in range(4)])
    lows = np.concatenate([np.roll(lw, s) for s in range(4)])
    return jnp.asarray(ups.reshape(-1, 64)), jnp.asarray(lows.reshape(-1, 64))


def test_int8_codes_f16_jnp_gives_centered_int8_code():
    u, lw = (np.asarray(a) for a in _plane_pairs_in_every_lane())
    lo, hi = nibbles.int8_codes_f16(jnp.asarray(u), jnp.asarray(lw), asm=False)
    assert lo.dtype == hi.dtype == jnp.float16
    u, lw = u.astype(np.int32), lw.astype(np.int32)
    np.testing.assert_array_equal(np.asarray(lo, np.float32), 16 * (u & 15) + (lw & 15) - 128)
    np.testing.assert_array_equal(np.asarray(hi, np.float32), (u & 0xF0) + (lw >> 4) - 128)


def test_int8_codes_f16_ptx_matches_jnp(fake_triton):
    u, lw = _plane_pairs_in_every_lane()
    got = nibbles.int8_codes_f16(u, lw, asm=True)
    want = nibbles.int8_codes_f16(u, lw, asm=False)
    assert len(fake_triton.sources) == 2 and all("fma.rn.f16x2" in s for s in fake_triton.sources)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_interpreter_catches_a_wrong_int8_select(fake_triton, monkeypatch):
    """A LOP3 that takes the lower plane's bits where the upper's belong gives other codes."""
    u, lw = _plane_pairs_in_every_lane()
    real = nibbles._asm
    monkeypatch.setattr(nibbles, "_asm", lambda src, *a, **k: real(src.replace("0xE4", "0xD8"), *a, **k))
    got, _ = nibbles.int8_codes_f16(u, lw, asm=True)
    want, _ = nibbles.int8_codes_f16(u, lw, asm=False)
    assert not np.array_equal(_bits(got), _bits(want))


# ---------------------------------------------------------------------------------------
# word_dot16: the INT4 GEMV's packed 16-bit inner product
# ---------------------------------------------------------------------------------------

def _word_dot_inputs(dtype, seed=0):
    """Every byte value in every lane of the code words, random 16-bit activations."""
    rng = np.random.default_rng(seed)
    w = np.asarray(_bytes_in_every_lane()).reshape(-1, 4).astype(np.uint32)
    w = np.concatenate([w, rng.integers(0, 256, (192, 4), dtype=np.uint32)])  # 448 words
    w = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16) | (w[:, 3] << 24)
    x = np.asarray(rng.standard_normal((w.size, 4, 2)) * 3, dtype)  # (lo01, lo23, hi01, hi23) pairs
    xw = x.view(np.uint16).astype(np.uint32)
    xw = xw[..., 0] | (xw[..., 1] << 16)
    return w, x.astype(np.float64), [jnp.asarray(xw[:, i]) for i in range(4)]


def _word_dot_emulated(w, x, dtype):
    """What the PTX must compute: per half of the 16-bit pair (even bytes, odd bytes) a chain of
    four fmas rounded once each to dtype (lo codes of bytes (0|1), (2|3), then hi codes), then
    the two halves added in float32."""
    rnd = lambda v: np.asarray(v, dtype).astype(np.float64)  # noqa: E731
    out = np.zeros(w.size, np.float32)
    for lane in (0, 1):
        acc = np.zeros(w.size)
        for word, nib in ((0, 0), (1, 0), (2, 4), (3, 4)):  # (x word, nibble shift)
            byte = (w >> (8 * (lane + 2 * (word % 2)))) & 0xFF
            code = ((byte >> nib) & 0xF).astype(np.float64) - nibbles.CENTER
            acc = rnd(code * x[:, word, lane] + acc)
        out = out + acc.astype(np.float32)
    return out


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_word_dot16_ptx_matches_emulation_and_jnp(fake_triton, dtype):
    w, x, xw = _word_dot_inputs(dtype)
    got = np.asarray(nibbles.word_dot16(jnp.asarray(w), xw, dtype, asm=True))
    assert len(fake_triton.sources) == 1 and "prmt" in fake_triton.sources[0]
    np.testing.assert_array_equal(got, _word_dot_emulated(w, x, dtype))
    exact = np.asarray(nibbles.word_dot16(jnp.asarray(w), xw, dtype, asm=False))  # float32, no 16-bit rounding
    scale = np.abs(x).sum(axis=(1, 2)) * 8
    assert np.all(np.abs(got - exact) <= scale * (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -9))


def test_word_dot16_jnp_is_the_centered_dot():
    w, x, xw = _word_dot_inputs(jnp.bfloat16, seed=1)
    got = np.asarray(nibbles.word_dot16(jnp.asarray(w), xw, jnp.bfloat16, asm=False))
    want = np.zeros(w.size)
    for k in range(4):
        byte = (w >> (8 * k)) & 0xFF
        want += ((byte & 0xF) - 8.0) * x[:, k // 2, k % 2] + ((byte >> 4) - 8.0) * x[:, 2 + k // 2, k % 2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_interpreter_catches_a_wrong_hi_code_mask(fake_triton, monkeypatch):
    """The word_dot16 check can fail: f16 high codes masked at the low nibble give other sums."""
    w, x, xw = _word_dot_inputs(jnp.float16)
    real = nibbles._asm
    monkeypatch.setattr(nibbles, "_asm", lambda src, *a, **k: real(src.replace("0x00F000F0", "0x000F000F"), *a, **k))
    got = np.asarray(nibbles.word_dot16(jnp.asarray(w), xw, jnp.float16, asm=True))
    assert not np.array_equal(got, _word_dot_emulated(w, x, jnp.float16))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mul16_words_ptx_matches_jnp(fake_triton, dtype):
    _, _, xw = _word_dot_inputs(dtype, seed=2)
    got = nibbles.mul16_words(xw[0], xw[1], dtype, asm=True)
    want = nibbles.mul16_words(xw[0], xw[1], dtype, asm=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

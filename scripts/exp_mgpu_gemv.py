#!/usr/bin/env python
"""Prototype: the draft's INT4 GEMV (M = 1) in Mosaic GPU, swap AB, against the Triton `int4_matmul`.

The question it answers: can a TMA-fed Mosaic kernel read the INT4 weights faster than the
Pallas-Triton GEMV (25-27 us for gate / up at 32K in the draft step, against a read floor of ~22)?

Per program (a block of 128 output rows, a range of K groups), one warpgroup over one group (128
values of K) per step, fed by a TMA pipeline of `stages` steps:
- A: the packed tile uint8 [128 rows, 64 bytes] (byte j: k = j low nibble, k = 64 + j high) into
  registers, dequantized to c * scale + minimum in f16 by `mgpu_attention`'s inline PTX (`_ASM4`)
  with the row's statistics broadcast along the columns: the low nibbles are K's first half, the
  high nibbles its second;
- B: x of the group as f16 [8, 64] per half, row 0 the activations (rows 1..7 zero: wgmma's N = 8);
- acc [128, 8] f32 over all steps; column 0 is the output, written as f32 [split_k, N, 8].
The statistics come transposed, f16 [n_groups, N] (a [1, 128] TMA box per step), and x already in
the B layout (`x_tiles`); a decoder would need both from their producers.

    PYTHONPATH=. python3 scripts/exp_mgpu_gemv.py            # CPU: interpret mode, small shapes
    PYTHONPATH=. python3 scripts/exp_mgpu_gemv.py gpu        # H100: checks, then timings vs Triton
    PYTHONPATH=. python3 scripts/exp_mgpu_gemv.py probes     # H100: gate / up probes (what each part costs)
    ncu ... python3 scripts/exp_mgpu_gemv.py once            # one gate / up call of each (Nsight)

Status (H100, 2026-11-27, docs/benchmarks.md session 13): correct (1.5e-5 codes, 1.9e-4 fma) and
level with the Triton GEMV. Best forms: gate / up 24.8 us against 25.4 (group-major, codes, rows
128); down 13.9 against 15.4, qkv 7.7 against 7.9 and o 6.0 against 6.2 (rows 64, split 4; their
partial sums not counted). The group-major layout is what made it competitive (gate / up 32.7 ->
24.8 us); Nsight has it latency-bound with 6.8 warps per SM. Not used by the decoder.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pallas_kernels.mgpu_attention import WGMMA, dequant, pair_asm  # noqa: E402

ROWS, G, HALF, NB = 128, 128, 64, 8
ROW = WGMMA.reduce(1)  # a [rows] vector broadcast along the columns of [rows, cols]


# A = the codes alone: one prmt spreads a register's two bytes to [b0, 0, b1, 0], one lop3 per nibble
# puts them under the f16 exponent of 1024: 1024 + c (low nibble), 1024 + 16 c (high nibble), exact.
_ASM_CODES = ("{ .reg .b32 t; prmt.b32 t, $2, 0, 0x4140; "
              "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; lop3.b32 $1, t, 0x00F000F0, 0x64006400, 0xEA; }")


def codes_asm(shape):
    """Inline Mosaic GPU: int8 [rows, cols] (WGMMA) -> (1024 + low nibble, 1024 + 16 * high nibble) f16."""
    return pair_asm(shape, _ASM_CODES, "=r,=r,r", 1, 1)


def x_tiles_codes(x, ng):
    """For the codes variant: x [K] -> (f16 [ng, 2, NB, 64] with the high half divided by 16, exact;
    f32 [2, ng]: each group's offset 1024 * sum(x_lo) + 64 * sum(x_hi) and its sum(x))."""
    xf = jnp.pad(x.astype(jnp.float16), (0, ng * G - x.shape[0])).reshape(ng, 2, HALF)
    xf = xf * jnp.asarray([1.0, 1.0 / 16], jnp.float16)[None, :, None]
    sums = jnp.sum(xf.astype(jnp.float32), axis=-1)  # [ng, 2] (the high half already / 16)
    aux = jnp.stack([1024 * sums[:, 0] + 1024 * sums[:, 1], sums[:, 0] + 16 * sums[:, 1]])
    return jnp.pad(xf[:, :, None, :], ((0, 0), (0, 0), (0, NB - 1), (0, 0))), aux


def x_tiles(x, ng):
    """x [K] -> f16 [ng, 2, NB, 64]: group g's halves as row 0 of an [NB, 64] tile (B, K-major)."""
    xg = jnp.pad(x.astype(jnp.float16), (0, ng * G - x.shape[0])).reshape(ng, 2, 1, HALF)
    return jnp.pad(xg, ((0, 0), (0, 0), (0, NB - 1), (0, 0)))


def mgpu_gemv(xt, packed, scale_t, min_t, *, split_k=1, stages=4, aux=None, group_major=False, per_step=1,
              rows=ROWS, probe=None, interpret=False):
    """xt f16 [ng, 2, 8, 64] (`x_tiles`), packed uint8 [N, ng, 64], scale_t / min_t f16 [ng, N]
    -> f32 [split_k, N, 8] partials (column 0 the output).

    aux (the "codes" variant, `x_tiles_codes`): A is the codes alone (1024 + c), each group gets its
    own accumulator, and the statistics apply after the product: acc += s * (acc_g - offset_g) +
    mn * sum(x_g), offset_g and sum(x_g) from aux f32 [2, ng]."""
    codes = aux is not None
    if group_major:  # packed uint8 [ng, N, 64]: a step's tile is 8 KB in one piece
        ng, n, half = packed.shape
    else:
        n, ng, half = packed.shape
    assert half == HALF and n % rows == 0 and ng % split_k == 0, (packed.shape, split_k)
    gps = ng // split_k
    S = per_step  # groups per pipeline step (group_major and aux only above 1): one wgmma wait per step
    assert S == 1 or (group_major and codes and gps % S == 0), (S, group_major, codes, gps)
    steps = gps // S
    i8 = jnp.int8

    def tr(row_bytes, itemsize):
        return (plgpu.TilingTransform((8, row_bytes // itemsize)), plgpu.SwizzleTransform(row_bytes))

    def body(*refs):
        if codes:
            x_g, p_g, s_g, m_g, aux_g, o_g, p_s, x_s, s_s, m_s, a_s, o_s, bars, aux_s, abar = refs
        else:
            x_g, p_g, s_g, m_g, o_g, p_s, x_s, s_s, m_s, a_s, o_s, bars = refs
        j, sk = lax.axis_index("n"), lax.axis_index("k")
        g0 = sk * gps
        if codes:
            plgpu.copy_gmem_to_smem(aux_g, aux_s, abar.at[0])

        def fetch(i, slot):
            g = g0 + i * S
            if group_major:
                plgpu.copy_gmem_to_smem(p_g.at[pl.ds(g, S), pl.ds(j * rows, rows)], p_s.at[slot], bars.at[slot])
            else:
                plgpu.copy_gmem_to_smem(p_g.at[pl.ds(j * rows, rows), g], p_s.at[slot, 0], bars.at[slot])
            if probe == "stream_w":  # the weight tiles alone
                return
            plgpu.copy_gmem_to_smem(x_g.at[pl.ds(g, S)], x_s.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(s_g.at[pl.ds(g, S), pl.ds(j * rows, rows)], s_s.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(m_g.at[pl.ds(g, S), pl.ds(j * rows, rows)], m_s.at[slot], bars.at[slot])

        for i in range(min(stages, steps)):
            fetch(i, i)
        if codes:
            plgpu.barrier_wait(abar.at[0])

        def loop_probe(i, acc):  # timing probes (wrong results): the pipeline alone, or no wgmma
            slot = i % stages
            plgpu.barrier_wait(bars.at[slot])
            bc = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, (rows, NB), [0]), WGMMA)  # noqa: E731
            v = plgpu.load(s_s.at[slot, 0], layout=ROW).astype(jnp.float32)
            if probe == "nomma":
                w = plgpu.layout_cast(p_s[slot, 0], WGMMA)
                lo, hi = codes_asm(w.shape)(w)
                v = v + plgpu.layout_cast(jnp.sum((lo + hi).astype(jnp.float32), axis=1), ROW)
            pl.when(i + stages < steps)(lambda: fetch(i + stages, slot))
            return acc + bc(v)

        def loop_codes(i, acc):
            slot = i % stages
            plgpu.barrier_wait(bars.at[slot])
            a_ops = []
            for u in range(S):
                w = plgpu.layout_cast(p_s[slot, u], WGMMA)
                if interpret:
                    c = w.astype(jnp.int32)
                    a_ops.append(tuple(plgpu.layout_cast((v + 1024).astype(jnp.float16), WGMMA)
                                       for v in (c & 0xF, (c & 0xF0))))
                else:
                    a_ops.append(codes_asm(w.shape)(w))
            bc = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, (rows, NB), [0]), WGMMA)  # noqa: E731

            def mm(*acc_refs):  # all products issued, one wait
                for u, acc_ref in enumerate(acc_refs):
                    for h in range(2):
                        if interpret:
                            a_s[h] = a_ops[u][h]
                            plgpu.commit_smem()
                            plgpu.wgmma(acc_ref, a_s.at[h], x_s.at[slot, u, h].T)
                            plgpu.wgmma_wait(0)
                        else:
                            plgpu.wgmma(acc_ref, a_ops[u][h], x_s.at[slot, u, h].T)
                plgpu.wgmma_wait(0)
                return [r[...] for r in acc_refs]
            parts = pl.run_scoped(mm, *[plgpu.ACC((rows, NB), jnp.float32) for _ in range(S)])
            for u, part in enumerate(parts):
                sc = plgpu.load(s_s.at[slot, u], layout=ROW).astype(jnp.float32)
                mn = plgpu.load(m_s.at[slot, u], layout=ROW).astype(jnp.float32)
                off, xs = aux_s[0, g0 + i * S + u], aux_s[1, g0 + i * S + u]
                acc = acc + bc(sc) * (plgpu.layout_cast(part, WGMMA) - off) + bc(mn) * xs
            pl.when(i + stages < steps)(lambda: fetch(i + stages, slot))
            return acc

        def loop(i, acc):
            slot = i % stages
            plgpu.barrier_wait(bars.at[slot])
            sc = plgpu.load(s_s.at[slot, 0], layout=ROW)
            mn = plgpu.load(m_s.at[slot, 0], layout=ROW)
            lo, hi = dequant(plgpu.layout_cast(p_s[slot, 0], WGMMA), None, (sc, mn), (sc, mn), interpret,
                             stats_axis=0)  # the row's statistics for both nibbles
            if interpret:  # the interpreter's wgmma takes A from shared memory, one product per accumulator
                def prod(a, h):
                    a_s[h] = a
                    plgpu.commit_smem()

                    def mm(acc_ref):
                        plgpu.wgmma(acc_ref, a_s.at[h], x_s.at[slot, 0, h].T)
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]
                    return plgpu.layout_cast(pl.run_scoped(mm, plgpu.ACC((rows, NB), jnp.float32)), WGMMA)
                acc = acc + prod(lo, 0) + prod(hi, 1)
            else:
                def mm(ref):
                    plgpu.wgmma(ref, lo, x_s.at[slot, 0, 0].T)
                    plgpu.wgmma(ref, hi, x_s.at[slot, 0, 1].T)
                acc = pl.run_state(mm)(plgpu.ACC.init(acc))
            pl.when(i + stages < steps)(lambda: fetch(i + stages, slot))
            return acc

        acc = lax.fori_loop(0, steps, loop_probe if probe else loop_codes if codes else loop,
                            plgpu.layout_cast(jnp.zeros((rows, NB), jnp.float32), WGMMA))
        o_s[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_g.at[sk, pl.ds(j * rows, rows)])
        plgpu.wait_smem_to_gmem(0)

    f16 = jnp.float16
    scratch = [plgpu.SMEM((stages, S, rows, HALF), i8, transforms=tr(HALF, 1)),
               plgpu.SMEM((stages, S, 2, NB, HALF), f16, transforms=tr(2 * HALF, 2)),
               plgpu.SMEM((stages, S, rows), f16), plgpu.SMEM((stages, S, rows), f16),
               (plgpu.SMEM((2, rows, HALF), f16, transforms=tr(2 * HALF, 2)) if interpret
                else plgpu.SMEM((1,), jnp.float32)),
               plgpu.SMEM((rows, NB), jnp.float32),
               plgpu.Barrier(num_arrivals=1 if probe == "stream_w" else 4, num_barriers=stages)]
    if codes:
        scratch += [plgpu.SMEM((2, ng), jnp.float32), plgpu.Barrier(num_barriers=1)]
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        params = InterpretGPUParams()
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split_k, n, NB), jnp.float32), scratch_types=scratch,
        grid=(n // rows, split_k), grid_names=("n", "k"), num_threads=1, thread_name="wg", interpret=params,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=True, unsafe_no_auto_barriers=True))
    return kernel(xt, lax.bitcast_convert_type(packed, i8), scale_t, min_t, *([aux] if codes else []))


def gemv(x, packed, scale, minimum, *, codes=False, group_major=False, **kw):
    """y [N] f32 = x [K] @ W (the prototype end to end, the layout changes outside the kernel)."""
    ng = packed.shape[1]
    if group_major:
        packed = jnp.transpose(packed, (1, 0, 2))
        kw["group_major"] = True
    if codes:
        xt, aux = x_tiles_codes(x, ng)
        part = mgpu_gemv(xt, packed, scale.T, minimum.T, aux=aux, **kw)
    else:
        part = mgpu_gemv(x_tiles(x, ng), packed, scale.T, minimum.T, **kw)
    return part[:, :, 0].sum(0)


def random_weights(rng, n, k):
    ng = k // G
    packed = jnp.asarray(rng.integers(0, 256, (n, ng, HALF)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(0.001, 0.01, (n, ng)), jnp.float16)
    mn = jnp.asarray(-8 * np.asarray(scale, np.float32) + 0.001 * rng.standard_normal((n, ng)), jnp.float16)
    return packed, scale, mn


def check(interpret, shapes):
    from pallas_kernels.int4_matmul import int4_matmul_reference
    rng = np.random.default_rng(0)
    worst = 0.0
    for n, k, split in shapes:
        packed, scale, mn = random_weights(rng, n, k)
        x = jnp.asarray(rng.standard_normal(k), jnp.bfloat16)
        ref = np.asarray(int4_matmul_reference(x[None].astype(jnp.float32), packed, scale, mn, group_size=G)[0])
        for codes, gm, ps, rw in ((False, False, 1, 128), (True, True, 1, 128), (True, True, 2, 128),
                                  (True, True, 1, 64)):
            got = np.asarray(gemv(x, packed, scale, mn, split_k=split, codes=codes, group_major=gm, per_step=ps,
                                  rows=rw, interpret=interpret))
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            worst = max(worst, err)
            print(f"check N={n} K={k} split_k={split} codes={codes} group_major={gm} per_step={ps} rows={rw}: "
                  f"max rel err {err:.2e}",
                  flush=True)
    return worst


def timing_inputs(rng, k, n):
    """Random weights of one shape as the timers take them: x, rotating copies in the decoder's
    layout (for the Triton GEMV) and group-major with transposed statistics (a layout, not timed),
    and x as the codes form's B tiles and offsets."""
    import bench_kernels as bk
    packed, scale, mn = random_weights(rng, n, k)
    qbytes = packed.size + 4 * scale.size
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
    sets = bk.copies_of((packed, scale, mn), bk.n_copies(qbytes, 64))
    gsets = [(jnp.transpose(p, (1, 0, 2)), s.T, m_.T) for p, s, m_ in sets]
    return x, qbytes, sets, gsets, x_tiles_codes(x[0], k // G)


# the forms of the last timing run: (stages, groups per step, rows), group-major weights, codes
TIMED_FORMS = ((4, 1, 128), (2, 2, 128), (4, 1, 64), (6, 1, 64), (4, 2, 64))


def timings(out):
    import bench_kernels as bk
    from pallas_kernels.int4_matmul import int4_matmul
    bk.PROFILE = True
    rows = []
    rng = np.random.default_rng(1)
    for name, k, n, splits in (("qkv", 4096, 6144, (2, 4)), ("o", 4096, 4096, (4, 8)),
                               ("gate_up", 4096, 28672, (1,)), ("down", 14336, 4096, (4, 8))):
        x, qbytes, sets, gsets, (xc, aux) = timing_inputs(rng, k, n)
        tri = bk.time_calls(lambda p, s, m_: int4_matmul(x, p, s, m_, group_size=G), sets, reps=5,
                            main_kernel=("int4",))
        row = dict(shape=name, k=k, n=n, mb=qbytes / 1e6, triton_us=tri["kernel_s"] * 1e6)
        for split in splits:
            for stages, ps, rw in TIMED_FORMS:
                if (k // G // split) % ps:
                    continue
                key = f"gm_codes_s{split}_st{stages}_ps{ps}_r{rw}_us"
                fn = lambda p, st, mt: mgpu_gemv(xc, p, st, mt, split_k=split, stages=stages, aux=aux,  # noqa: E731
                                                 group_major=True, per_step=ps, rows=rw)
                try:
                    row[key] = bk.time_calls(fn, gsets, reps=5)["kernel_s"] * 1e6
                except Exception as e:  # noqa: BLE001
                    row[key] = None
                    print(f"ERROR {name} {key}: {type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(row, flush=True)
        del sets, gsets
    out["timings"] = rows
    for r in rows:
        ms = [f"{k[:-3]} {v:.1f}" if v else f"{k[:-3]} -" for k, v in r.items()
              if k.endswith("_us") and k != "triton_us"]
        print(f"| {r['shape']} | {r['mb']:.1f} MB | Triton {r['triton_us']:.1f} | " + " | ".join(ms) + " |")


def probes(out):
    """gate / up: the TMA pipeline alone ("stream", and "stream_w": the weight tiles only), + the
    codes' unpacking without wgmma ("nomma"), the whole kernel, and the Triton GEMV, in one run."""
    import bench_kernels as bk
    from pallas_kernels.int4_matmul import int4_matmul
    bk.PROFILE = True
    x, _, sets, gsets, (xc, aux) = timing_inputs(np.random.default_rng(1), 4096, 28672)
    res = {"triton": bk.time_calls(lambda p, s, m_: int4_matmul(x, p, s, m_, group_size=G), sets, reps=5)["kernel_s"]}
    del sets
    for probe, stages in (("stream", 4), ("nomma", 4), (None, 4), ("stream", 2), ("stream", 8), ("stream_w", 4),
                          ("stream_w", 8), ("stream_w", 12)):
        fn = lambda p, st, mt: mgpu_gemv(xc, p, st, mt, aux=aux, group_major=True, probe=probe,  # noqa: E731
                                         stages=stages)
        try:
            res[f"{probe or 'full'}_st{stages}"] = bk.time_calls(fn, gsets, reps=5)["kernel_s"]
        except Exception as e:  # noqa: BLE001
            print(f"ERROR {probe} {stages}: {type(e).__name__}: {str(e)[:300]}")
    out["probes_gate_up_us"] = {kk: v * 1e6 for kk, v in res.items()}
    print("gate / up probes (us):", {kk: round(v * 1e6, 1) for kk, v in res.items()}, flush=True)


def once():
    """One gate / up call of the best prototype form and one of the Triton GEMV (for ncu)."""
    from pallas_kernels.int4_matmul import int4_matmul
    rng = np.random.default_rng(1)
    k, n = 4096, 28672
    packed, scale, mn = random_weights(rng, n, k)
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
    xc, aux = x_tiles_codes(x[0], k // G)
    gm = jnp.transpose(packed, (1, 0, 2))
    f = jax.jit(lambda p, st, mt: mgpu_gemv(xc, p, st, mt, stages=4, aux=aux, group_major=True))
    jax.block_until_ready(f(gm, scale.T, mn.T))
    jax.block_until_ready(int4_matmul(x, packed, scale, mn, group_size=G))


def main():
    if "once" in sys.argv[1:]:
        return once()
    if "probes" in sys.argv[1:]:
        out = {"card": jax.devices()[0].device_kind}
        probes(out)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "exp_mgpu_gemv_probes.json"), "w") as f:
                json.dump(out, f, indent=1)
        return
    gpu = "gpu" in sys.argv[1:]
    out = {"card": jax.devices()[0].device_kind}
    if gpu:
        out["check_worst"] = check(False, [(256, 512, 1), (6144, 4096, 4), (4096, 14336, 8)])
        timings(out)
    else:
        out["check_worst"] = check(True, [(256, 512, 1), (256, 512, 2)])
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "exp_mgpu_gemv.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

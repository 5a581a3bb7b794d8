"""Weight layout and matrix-vector speed: does storing a weight column-major make decoding's products faster?

`F.linear(x, W)` computes x @ W.T with nn.Linear's weight W of shape (out, in). Stored as usual (row-major,
strides (in, 1)), the BLAS reads it as the transpose of an (in, out) matrix; stored column-major (the same
shape and values, strides (1, out): `W.t().contiguous().t()`), it reads a contiguous (in, out) matrix, the
way the stacked experts (E, D, F) are used by `x @ w[e]`. Both give the same products up to rounding; only
the kernel differs. This script times both layouts for every matrix shape of one decoding step of the
benchmark model (bench/common.py), at batch 1 and 8, in fp32 and bf16, and then whole steps' worth of
products in three layouts: as loaded, everything column-major, and what `model.prepare_for_decode` chooses.

Each shape gets a pool of distinct matrices of at least --pool-mb MB in all (well above the 32 MB L3 cache),
multiplied one after the other, so that every product reads its weight from memory as decoding does. The
layouts alternate (A B B A ...); every number is a median.

    python bench/layout.py
    python bench/layout.py --dtypes fp32 --batches 1 --repeats 5
"""
from __future__ import annotations

import argparse

import common  # first: sets up the path and OpenMP before torch loads
import torch
import torch.nn.functional as F

from model import column_major_pays, laid_out_for_decode

# (out, in) of every matrix one decoding step of the benchmark model multiplies, and what uses it. The routed
# experts are stored (in, out) already: w1/w3 (D, F), w2 (F, D).
SHAPES = [((512, 512), "wq, wo"), ((128, 512), "wk, wv"), ((16, 512), "router"),
          ((1024, 512), "shared w1, w3; experts w1, w3"), ((512, 1024), "shared w2; experts w2"),
          ((32000, 512), "output")]


def column_major(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


def chosen(out: int, inp: int, dtype: torch.dtype) -> str:
    """The layout model.prepare_for_decode gives an (out, in) weight: fp32 by column_major_pays, else as stored."""
    if dtype != torch.float32:
        return "as stored"
    return "col" if column_major_pays(out, inp) else "row"


def pool(shape, dtype, megabytes: float, layout: str) -> list[torch.Tensor]:
    n = max(1, int(megabytes * 1e6 // (shape[0] * shape[1] * dtype.itemsize)))
    ws = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    return [column_major(w) for w in ws] if layout == "col" else ws


def per_shape(dtype_name: str, batch: int, a) -> list[list]:
    dtype = common.DTYPES[dtype_name]
    rows = []
    for (out, inp), used_by in SHAPES:
        x = torch.randn(batch, inp, dtype=dtype)
        pools = {layout: pool((out, inp), dtype, a.pool_mb, layout) for layout in ("row", "col")}
        runs = {layout: (lambda ws=ws: [F.linear(x, w) for w in ws]) for layout, ws in pools.items()}
        times = common.interleaved(runs, a.repeats, warmup=1)
        gbs = {k: len(pools[k]) * out * inp * dtype.itemsize / common.median(v) / 1e9 for k, v in times.items()}
        rows.append([dtype_name, batch, f"{out} x {inp}", used_by, f"{gbs['row']:.1f}", f"{gbs['col']:.1f}",
                     f"{gbs['col'] / gbs['row']:.2f}x", chosen(out, inp, dtype)])
        del pools, runs
    return rows


# One layer's matrices in one decoding step at batch 1: (out, in), and whether the checkpoint stores it (in, out)
# (the routed expert chosen: w1, w3, w2); then the output head, once per step.
STEP_LAYER = [((512, 512), False), ((128, 512), False), ((128, 512), False), ((512, 512), False),  # wq wk wv wo
              ((16, 512), False),  # router
              ((1024, 512), False), ((1024, 512), False), ((512, 1024), False),  # shared expert w1 w3 w2
              ((1024, 512), True), ((1024, 512), True), ((512, 1024), True)]  # one routed expert w1 w3 w2


def step_weights(dtype: torch.dtype, layout: str, layers: int = 8) -> list[torch.Tensor]:
    """One decoding step's weights, each (out, in) for F.linear, laid out as `layout`: "loaded" (as the
    checkpoint stores them: nn.Linear row-major, experts column-major), "col" (all column-major) or "chosen"
    (what model.laid_out_for_decode makes of the stored tensor, as prepare_for_decode does)."""
    ws = []
    for (out, inp), stored_col in STEP_LAYER * layers + [((32000, 512), False)]:
        w = torch.randn(out, inp, dtype=dtype)
        if layout == "col":
            ws.append(column_major(w))
            continue
        stored = column_major(w).t() if stored_col else w  # as in the checkpoint: (in, out) or (out, in)
        if layout == "chosen":
            stored = laid_out_for_decode(stored, stored_col)
        ws.append(stored.t() if stored_col else stored)
    return ws


def whole_step(dtype_name: str, batch: int, a) -> list[list]:
    dtype = common.DTYPES[dtype_name]
    weights = {layout: step_weights(dtype, layout) for layout in ("loaded", "col", "chosen")}
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype) for w in weights["loaded"]}
    runs = {k: (lambda ws=ws: [F.linear(xs[w.shape[1]], w) for w in ws]) for k, ws in weights.items()}
    times = common.interleaved(runs, a.repeats, warmup=1)
    nbytes = sum(w.numel() * w.element_size() for w in weights["loaded"])
    med = {k: common.median(v) for k, v in times.items()}
    return [[dtype_name, batch, k, f"{med[k] * 1e3:.2f}", f"{nbytes / med[k] / 1e9:.1f}",
             f"{med['loaded'] / med[k]:.2f}x"] for k in ("loaded", "col", "chosen")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=9, help="timed sweeps per layout (9)")
    p.add_argument("--pool-mb", type=float, default=96.0, help="MB of distinct matrices per shape (96)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    common.setup(a.threads)
    load = common.load_average()
    shape_rows, step_rows = [], []
    for dtype_name in a.dtypes:
        for batch in a.batches:
            shape_rows += per_shape(dtype_name, batch, a)
            step_rows += whole_step(dtype_name, batch, a)
            print(f"  {dtype_name} batch {batch} done", flush=True)
    title = f"{common.machine()}; load average {load} -> {common.load_average()}"
    common.print_table(
        f"F.linear(x, W) by weight layout, GB/s of weight read (median of {a.repeats}); {title}",
        ["dtype", "batch", "W (out x in)", "used by", "row-major GB/s", "column-major GB/s", "col / row",
         "prepare_for_decode"], shape_rows)
    common.print_table(
        f"One decoding step's weight products (8 layers + output head, one expert per layer), by layout "
        f"(median of {a.repeats})",
        ["dtype", "batch", "layout", "ms", "GB/s", "vs as loaded"], step_rows,
        ["as loaded: nn.Linear row-major, experts column-major (their (in, out) storage); col: every matrix "
         "column-major; chosen: what `model.prepare_for_decode` does (fp32: column-major where "
         "`model.column_major_pays` says so; bf16: as loaded)."])


if __name__ == "__main__":
    main()

"""Weight layout and matrix-vector speed: what cpu_decode.prepare_for_decode is based on.

`F.linear(x, W)` computes x @ W.T with nn.Linear's weight W of shape (out, in). The same product can read W
three ways: row-major as stored (strides (in, 1)); column-major (strides (1, out), a contiguous (in, out)
underneath, the way the stacked experts (E, D, F) are used by `x @ w[e]`); or packed once into oneDNN's
blocked layout (`cpu_decode.PackedLinear`). This script times all three for every matrix shape of one
decoding step of the benchmark model (bench/common.py), fused ones included (wq|wk|wv, w1|w3), at batch 1
and 8, in fp32 and bf16; then whole steps' worth of products three ways: as loaded (89 products), fused
with plain weights (49: cpu_decode's fallback where oneDNN is missing), fused and packed (prepare_for_decode).

Each shape gets a pool of distinct matrices of at least --pool-mb MB in all (well above the 32 MB L3 cache),
multiplied one after the other, so that every product reads its weight from memory as decoding does. The
layouts alternate (A B C C B A ...); every number is a median.

    python bench/layout.py
    python bench/layout.py --dtypes fp32 --batches 1 --repeats 5
"""
from __future__ import annotations

import argparse

import common  # first: puts the project on the path
import torch
import torch.nn.functional as F

from cpu_decode import PackedLinear, packs

# (out, in) of every matrix one decoding step of the benchmark model multiplies, and what uses it.
SHAPES = [((512, 512), "wq, wo"), ((128, 512), "wk, wv"), ((768, 512), "wq|wk|wv (fused)"), ((16, 512), "router"),
          ((1024, 512), "w1, w3 (shared, experts)"), ((2048, 512), "w1|w3 (fused)"),
          ((512, 1024), "w2 (shared, experts)"), ((32000, 512), "output")]
LAYOUTS = ("row", "col", "packed")


def products(shape, dtype, megabytes: float, layout: str) -> list:
    """A pool of distinct random (out, in) matrices, each as a callable x -> x @ W.T in `layout`."""
    n = max(1, int(megabytes * 1e6 // (shape[0] * shape[1] * dtype.itemsize)))
    ws = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    if layout == "packed":
        return [PackedLinear(w) for w in ws]
    if layout == "col":
        ws = [w.t().contiguous().t() for w in ws]
    return [lambda x, w=w: F.linear(x, w) for w in ws]


@torch.no_grad()
def per_shape(dtype_name: str, batch: int, a) -> list[list]:
    dtype = common.DTYPES[dtype_name]
    rows = []
    for (out, inp), used_by in SHAPES:
        x = torch.randn(batch, inp, dtype=dtype)
        pools = {layout: products((out, inp), dtype, a.pool_mb, layout) for layout in LAYOUTS}
        runs = {layout: (lambda ps=ps: [p(x) for p in ps]) for layout, ps in pools.items()}
        times = common.interleaved(runs, a.repeats, warmup=1)
        gbs = {k: len(pools[k]) * out * inp * dtype.itemsize / common.median(v) / 1e9 for k, v in times.items()}
        rows.append([dtype_name, batch, f"{out} x {inp}", used_by, *(f"{gbs[k]:.1f}" for k in LAYOUTS),
                     f"{gbs['packed'] / gbs['row']:.2f}x"])
        del pools, runs
    return rows


# One decoding step at batch 1, per layer: attention, router, shared expert, the one routed expert; then the
# output head. As loaded (each product on its own) and fused (products that share an input as one).
LOADED_LAYER = [(512, 512), (128, 512), (128, 512), (512, 512), (16, 512),
                (1024, 512), (1024, 512), (512, 1024), (1024, 512), (1024, 512), (512, 1024)]
FUSED_LAYER = [(768, 512), (512, 512), (16, 512), (2048, 512), (512, 1024), (2048, 512), (512, 1024)]


@torch.no_grad()
def whole_step(dtype_name: str, batch: int, a) -> list[list]:
    dtype = common.DTYPES[dtype_name]
    head = [(32000, 512)]
    shapes = {"as loaded": LOADED_LAYER * 8 + head, "fused, plain": FUSED_LAYER * 8 + head,
              "fused, packed": FUSED_LAYER * 8 + head}
    calls = {}
    for name, layer_shapes in shapes.items():
        packed = name == "fused, packed"  # every weight but the router's 16 rows, as cpu_decode does
        calls[name] = [(inp, products((out, inp), dtype, 0, "packed" if packed and out > 16 else "row")[0])
                       for out, inp in layer_shapes]
    xs = {inp: torch.randn(batch, inp, dtype=dtype) for inp in (512, 1024)}
    runs = {k: (lambda cs=cs: [p(xs[inp]) for inp, p in cs]) for k, cs in calls.items()}
    times = common.interleaved(runs, a.repeats, warmup=1)
    nbytes = sum(out * inp * dtype.itemsize for out, inp in shapes["as loaded"])
    med = {k: common.median(v) for k, v in times.items()}
    return [[dtype_name, batch, k, len(calls[k]), f"{med[k] * 1e3:.2f}", f"{nbytes / med[k] / 1e9:.1f}",
             f"{med['as loaded'] / med[k]:.2f}x"] for k in shapes]


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
    for name in a.dtypes:
        if not packs(common.DTYPES[name]):
            raise SystemExit(f"oneDNN cannot pack {name} on this machine: nothing to compare")
    shape_rows, step_rows = [], []
    for dtype_name in a.dtypes:
        for batch in a.batches:
            shape_rows += per_shape(dtype_name, batch, a)
            step_rows += whole_step(dtype_name, batch, a)
            print(f"  {dtype_name} batch {batch} done", flush=True)
    title = f"{common.machine()}; load average {load} -> {common.load_average()}"
    common.print_table(
        f"x @ W.T by weight layout, GB/s of weight read (median of {a.repeats}); {title}",
        ["dtype", "batch", "W (out x in)", "used by", "row-major GB/s", "column-major GB/s", "oneDNN-packed GB/s",
         "packed / row"], shape_rows)
    common.print_table(
        f"One decoding step's weight products (8 layers + output head, one routed expert per layer; "
        f"median of {a.repeats})",
        ["dtype", "batch", "products", "count", "ms", "GB/s", "vs as loaded"], step_rows,
        ["as loaded: every nn.Linear and expert matrix on its own, row-major, F.linear; fused: wq|wk|wv and "
         "each SwiGLU's w1|w3 as one product; packed: each weight but the router packed once for oneDNN "
         "(cpu_decode.prepare_for_decode)."])


if __name__ == "__main__":
    main()

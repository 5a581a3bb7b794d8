"""Weight layout and matrix-vector speed: what cpu_decode.prepare_for_decode is based on.

`F.linear(x, W)` computes x @ W.T with nn.Linear's weight W of shape (out, in). The same product can read W
three ways: row-major as stored (strides (in, 1)); column-major (strides (1, out), a contiguous (in, out)
underneath, the way the stacked experts (E, D, F) are used by `x @ w[e]`); or packed once into oneDNN's
blocked layout (`cpu_decode.PackedLinear`). This script times all three for every matrix shape of one
decoding step of the benchmark model (`--model`, bench/common.py), fused ones included (wq|wk|wv, w1|w3), at
batch 1 and 8, in fp32 and bf16; then whole steps' worth of products three ways: as loaded (11 products a
layer), fused with plain weights (7 a layer: cpu_decode's fallback where oneDNN is missing), fused and packed
(prepare_for_decode). Beside them, the same matrices read by `torch.sum`: how fast this machine streams
those bytes in pieces of that size, the speed a matrix-vector kernel could reach.

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


def model_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every weight matrix one decoding step of the benchmark model multiplies, by name."""
    c = common.MODELS[model]
    D, q, kv, F_ = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], \
        c["intermediate_size"]
    return {"wq": (q, D), "wk, wv": (kv, D), "wo": (D, q), "wq|wk|wv (fused)": (q + 2 * kv, D),
            "router": (c["num_local_experts"], D), "w1, w3 (shared, experts)": (F_, D), "w1|w3 (fused)": (2 * F_, D),
            "w2 (shared, experts)": (D, F_), "output": (c["vocab_size"], D)}


def distinct_shapes(model: str) -> list[tuple[tuple[int, int], str]]:
    """Each distinct shape once, with everything that uses it (in the wide model wq, wo, w1 and w2 are alike)."""
    users: dict[tuple[int, int], list[str]] = {}
    for name, shape in model_shapes(model).items():
        users.setdefault(shape, []).append(name)
    return [(shape, ", ".join(names)) for shape, names in users.items()]


def step_shapes(model: str) -> dict[str, list[tuple[int, int]]]:
    """One decoding step's products at batch 1 (attention, router, shared expert, the one routed expert per
    layer, then the output head), as loaded and fused."""
    s, layers = model_shapes(model), common.MODELS[model]["num_hidden_layers"]
    loaded = [s["wq"], s["wk, wv"], s["wk, wv"], s["wo"], s["router"]] + \
        2 * [s["w1, w3 (shared, experts)"], s["w1, w3 (shared, experts)"], s["w2 (shared, experts)"]]
    fused = [s["wq|wk|wv (fused)"], s["wo"], s["router"]] + 2 * [s["w1|w3 (fused)"], s["w2 (shared, experts)"]]
    return {"as loaded": loaded * layers + [s["output"]], "fused": fused * layers + [s["output"]]}


LAYOUTS = ("row", "col", "packed", "sum")


def products(shape, dtype, megabytes: float, layout: str) -> list:
    """A pool of distinct random (out, in) matrices, each as a callable x -> x @ W.T in `layout` (or, "sum",
    x -> W.sum(): the same bytes read by a plain reduction)."""
    n = max(1, int(megabytes * 1e6 // (shape[0] * shape[1] * dtype.itemsize)))
    ws = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    if layout == "sum":
        return [lambda x, w=w: w.sum() for w in ws]
    if layout == "packed":
        return [PackedLinear(w) for w in ws]
    if layout == "col":
        ws = [w.t().contiguous().t() for w in ws]
    return [lambda x, w=w: F.linear(x, w) for w in ws]


@torch.no_grad()
def per_shape(dtype_name: str, batch: int, a) -> list[list]:
    dtype = common.DTYPES[dtype_name]
    rows = []
    for (out, inp), used_by in distinct_shapes(a.model):
        x = torch.randn(batch, inp, dtype=dtype)
        pools = {layout: products((out, inp), dtype, a.pool_mb, layout) for layout in LAYOUTS}
        runs = {layout: (lambda ps=ps: [p(x) for p in ps]) for layout, ps in pools.items()}
        times = common.interleaved(runs, a.repeats, warmup=1)
        gbs = {k: len(pools[k]) * out * inp * dtype.itemsize / common.median(v) / 1e9 for k, v in times.items()}
        rows.append([dtype_name, batch, f"{out} x {inp}", used_by, *(f"{gbs[k]:.1f}" for k in LAYOUTS),
                     f"{gbs['packed'] / gbs['row']:.2f}x", f"{100 * gbs['packed'] / gbs['sum']:.0f}%"])
        del pools, runs
    return rows


@torch.no_grad()
def whole_step(dtype_name: str, batch: int, a) -> list[list]:
    dtype = common.DTYPES[dtype_name]
    steps = step_shapes(a.model)
    shapes = {"as loaded": steps["as loaded"], "fused, plain": steps["fused"], "fused, packed": steps["fused"],
              "the same bytes read by torch.sum": steps["fused"]}
    router = model_shapes(a.model)["router"]
    calls = {}
    for name, layer_shapes in shapes.items():
        layout = {"fused, packed": "packed", "the same bytes read by torch.sum": "sum"}.get(name, "row")
        calls[name] = [(inp, products((out, inp), dtype, 0, "row" if layout == "packed" and (out, inp) == router
                                      else layout)[0])  # the router stays plain, as in cpu_decode
                       for out, inp in layer_shapes]
    xs = {inp: torch.randn(batch, inp, dtype=dtype) for _, inp in steps["as loaded"]}
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
    common.add_model_option(p)
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
        f"x @ W.T by weight layout, model {a.model}, GB/s of weight read (median of {a.repeats}); {title}",
        ["dtype", "batch", "W (out x in)", "used by", "row-major GB/s", "column-major GB/s", "oneDNN-packed GB/s",
         "torch.sum GB/s", "packed / row", "packed / sum"], shape_rows)
    common.print_table(
        f"One decoding step's weight products, model {a.model} ({common.MODELS[a.model]['num_hidden_layers']} "
        f"layers + output head, one routed expert per layer; median of {a.repeats})",
        ["dtype", "batch", "products", "count", "ms", "GB/s", "vs as loaded"], step_rows,
        ["as loaded: every nn.Linear and expert matrix on its own, row-major, F.linear; fused: wq|wk|wv and "
         "each SwiGLU's w1|w3 as one product; packed: each weight but the router packed once for oneDNN "
         "(cpu_decode.prepare_for_decode); torch.sum: the fused step's weights read by a plain reduction, one "
         "call per matrix, no product."])


if __name__ == "__main__":
    main()

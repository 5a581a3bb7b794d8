"""Where a CPU decode step's time goes: weight products, the attention kernel, norms, and everything else.

Ours alone, the model as generate.py runs it on the CPU (`checkpoint.load_model(..., for_decode=True)`: fused
and packed by cpu_decode.py), batch 1, decoding positions 512, 513, ... after a 512-token prompt. Timers
(`time.perf_counter`) wrap the packed products (`cpu_decode.PackedLinear`), plain `nn.Linear` products (the
router), `F.scaled_dot_product_attention` and `RMSNorm`; "everything else" is the step's wall time minus
those: RoPE, QK-norm, the cache writes, masks, routing, activations, residual adds, and the Python between
them. The same step's products run back to back ("matmuls alone", as in bench/decode.py) and the bandwidth
bound (measured here, as bench/decode.py does) put those figures in proportion: if the products alone reach a
fraction p of the bound, decode at 50% of it leaves everything else 1/0.5 - 1/p bound-steps of time (at
p = 60%, a third of a bound-step: a fifth of the products' own time). A last row reads the same bytes
(plain copies of the same weights, one tensor per product) with `torch.sum`, back to back: how fast this
machine streams those bytes in chunks of that size, i.e. what the products would take if the matrix-vector
kernels read as fast as a plain reduction does.

    python bench/decode_breakdown.py
    python bench/decode_breakdown.py --model narrow --dtypes fp32
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import time

import common  # first: puts the project on the path
import decode  # bench/decode.py: the same prefill, decode loop and matmuls-alone
import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def timed(spent: dict):
    """Within: time spent in each kind of call accumulates in `spent` (seconds)."""
    import model
    from cpu_decode import PackedLinear

    def wrap(owner, attr, key):
        inner = getattr(owner, attr)

        def timer(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
            return out
        setattr(owner, attr, timer)
        return owner, attr, inner

    saved = [wrap(PackedLinear, "forward", "products"), wrap(nn.Linear, "forward", "router (plain products)"),
             wrap(F, "scaled_dot_product_attention", "attention kernel (SDPA)"),
             wrap(model.RMSNorm, "forward", "RMSNorm")]
    try:
        yield
    finally:
        for owner, attr, inner in saved:
            setattr(owner, attr, inner)


@torch.no_grad()
def sums_alone(model, steps: int):
    """A callable that, `steps` times, reads the bytes one batch-1 decoding step of the (as loaded) `model` reads
    -- every weight but the embedding table, one routed expert per MoE layer -- with one `torch.sum` per weight
    matrix, from plain contiguous copies (the products' weights are fused and packed: opaque to other ops)."""
    weights = []
    for name, p in model.named_parameters():
        if name == "tok_embeddings.weight" or p.ndim < 2:
            continue
        weights.append(p[0].clone() if ".experts." in name else p.clone())  # (E, ...) stacks: expert 0's slice
    weights = [w.contiguous() for w in weights]

    def go():
        for _ in range(steps):
            for w in weights:
                w.sum()
    return go


def breakdown(path, dtype_name: str, a) -> list[list]:
    import checkpoint

    dtype = common.DTYPES[dtype_name]
    plain = common.load_ours(path, dtype)
    m = checkpoint.load_model(path, dtype=dtype, for_decode=True)
    prompt = torch.randint(0, plain.args.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(1))
    cache, first = decode.prefill_ours(m, prompt, a.steps)
    n_moe = sum(hasattr(layer.feed_forward, "experts") for layer in plain.layers)
    bound = common.measure_bandwidth(repeats=5)["best"] * 1e9 / common.weight_bytes_per_step(plain, [1.0] * n_moe)
    alone = decode.matmuls_alone(m, 1, [1.0] * n_moe, a.steps)
    sums = sums_alone(plain, a.steps)
    decode.decode_ours(m, copy.deepcopy(cache), first, a.steps)  # warm up
    walls, parts, products, reads = [], [], [], []
    for _ in range(a.repeats):
        spent: dict[str, float] = {}
        c = copy.deepcopy(cache)
        with timed(spent):
            walls.append(common.timeit(lambda: decode.decode_ours(m, c, first, a.steps)) / a.steps)
        parts.append({k: v / a.steps for k, v in spent.items()})
        products.append(common.timeit(alone) / a.steps)
        reads.append(common.timeit(sums) / a.steps)
    wall = common.median(walls)
    keys = ["products", "router (plain products)", "attention kernel (SDPA)", "RMSNorm"]
    ms = {k: common.median([p.get(k, 0.0) for p in parts]) for k in keys}
    ms["everything else"] = wall - sum(ms.values())
    rows = [[dtype_name, k, f"{1e3 * v:.2f}", f"{100 * v / wall:.0f}%"] for k, v in ms.items()]
    rows.append([dtype_name, "step", f"{1e3 * wall:.2f}",
                 f"{1 / wall:.1f} tok/s = {100 / wall / bound:.0f}% of the bound ({bound:.0f} tok/s)"])
    rows.append([dtype_name, "products alone, back to back", f"{1e3 * common.median(products):.2f}",
                 f"{100 / common.median(products) / bound:.0f}% of the bound"])
    rows.append([dtype_name, "the same bytes read by torch.sum", f"{1e3 * common.median(reads):.2f}",
                 f"{100 / common.median(reads) / bound:.0f}% of the bound"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    decode.add_decode_options(p)
    a = p.parse_args()
    load, tmp, path = common.start(a)
    rows = []
    with tmp:
        for dtype_name in a.dtypes:
            rows += breakdown(path, dtype_name, a)
    common.print_table(
        f"One decode step at batch 1, model {a.model}, as generate.py runs it on the CPU, ms (median of "
        f"{a.repeats} x {a.steps} steps); {common.machine()}; load average {load} -> {common.load_average()}",
        ["dtype", "part", "ms/step", "share"], rows)


if __name__ == "__main__":
    main()

"""Where a batch-1 decode step's time goes on CUDA: `python bench/gpu_profile.py [--flavor debug|scout1]`.

Runs a few decode steps under torch.profiler and prints the ops that take the most GPU and CPU time, the number
of kernel launches per step, and the time of the expert matrix-vector products alone in both weight layouts.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import FLAVORS, Transformer, init_weights  # noqa: E402


def build(flavor: str) -> Transformer:
    args = replace(FLAVORS["debug"], vision=None) if flavor == "debug" else \
        replace(FLAVORS["scout"], n_layers=1, vision=None)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    init_weights(model)
    return model.eval()


def step_ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1000


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flavor", default="debug", choices=["debug", "scout1"])
    a = p.parse_args()
    model = build(a.flavor)
    cache = model.make_cache(1, 512)
    model(torch.arange(100, device="cuda")[None], cache=cache)
    tok = torch.tensor([[5]], device="cuda")
    print(f"{a.flavor}: decode step {step_ms(lambda: model(tok, cache=cache)):.2f} ms (synchronized every 20 steps)")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            model(tok, cache=cache)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"kernel launches per step: {launches / 5:.0f}")
    print(ka.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if a.flavor == "scout1":
        x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
        stack = model.layers[0].feed_forward.experts.w1  # (E, D, F)
        lin = torch.randn(8192, 5120, device="cuda", dtype=torch.bfloat16)
        print(f"x @ w1[e] (D, F) row-major: {step_ms(lambda: x @ stack[3], 200) * 1000:.1f} us; "
              f"F.linear(x, (F, D)): {step_ms(lambda: torch.nn.functional.linear(x, lin), 200) * 1000:.1f} us; "
              f"x @ w1[e] as (1,1,D) bmm: {step_ms(lambda: torch.matmul(x[None], stack[3][None]), 200) * 1000:.1f} us "
              f"(84 MB each: {84e6 / 4.2e12 * 1e6:.0f} us at 4.2 TB/s)")


if __name__ == "__main__":
    main()

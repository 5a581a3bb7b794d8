"""The MoE layer alone: our grouped dispatch vs transformers' `Llama4TextMoe` (every expert on every token).

One MoE layer of the benchmark model (--model wide: dim 1024, 16 experts of width 1024, top-1, plus the shared expert) is
built by transformers with its own initialization; ours gets the same weights (gate_up_proj split into
w1 / w3). Inputs of decode size (1 and 8 tokens) and prefill size (512 and 4096 tokens) go through both,
alternating; the table shows the median time per call and the tokens/s it means. Every expert runs on
every token in transformers' layer (zeros for the unchosen), so its cost does not fall with top-1 routing;
ours multiplies each token by its chosen expert only.

A second table times training's forward + backward through our layer, two ways: the experts' weights
taken apart once per forward (`Experts.taken_apart`, what moe.py does) and indexed per expert (`w1[e]`, what
it did before: autograd then builds a gradient of the whole (E, D, F) stack's size for every expert used and
sums them), with the bytes that backward allocates (torch.profiler). The gradients are identical.

    python bench/moe.py
    python bench/moe.py --tokens 1 4096 --dtypes fp32 --backward-tokens 512
"""
from __future__ import annotations

import argparse
import contextlib

import common  # first: puts the project's moe.py ahead of this file on the path
import torch
from moe import MoE


@torch.no_grad()
def build(dtype: torch.dtype, model: str = "wide", seed: int = 0):
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = common.hf_config(model)
    torch.manual_seed(seed)
    theirs = Llama4TextMoe(cfg)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = MoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok)
    F = cfg.intermediate_size
    ours.router.weight.copy_(theirs.router.weight)
    ours.experts.w1.copy_(theirs.experts.gate_up_proj[..., :F])
    ours.experts.w3.copy_(theirs.experts.gate_up_proj[..., F:])
    ours.experts.w2.copy_(theirs.experts.down_proj)
    for name in ("gate_proj", "up_proj", "down_proj"):
        ours_name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[name]
        getattr(ours.shared_expert, ours_name).weight.copy_(getattr(theirs.shared_expert, name).weight)
    return theirs.to(dtype).eval(), ours.to(dtype).eval()


def backward_rows(layer: MoE, dtype_name: str, n: int, repeats: int) -> list[list]:
    """Forward + backward of `layer` (trainable) on n tokens, weights taken apart once vs indexed per expert."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(n, layer.router.in_features, generator=torch.Generator().manual_seed(n)).to(layer.router.weight.dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)

    def step(how):
        def go():
            layer.zero_grad(set_to_none=True)
            with how():
                (layer(x) * g).sum().backward()
        return go
    ways = {"taken apart once": contextlib.nullcontext, "indexed per expert": common.experts_indexed_per_expert}
    times = common.interleaved({k: step(how) for k, how in ways.items()}, repeats, warmup=1)
    allocated, grads = {}, {}
    for k, how in ways.items():
        layer.zero_grad(set_to_none=True)
        with how():
            y = (layer(x) * g).sum()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                y.backward()
        allocated[k] = sum(ev.self_cpu_memory_usage for ev in prof.events() if ev.self_cpu_memory_usage > 0)
        grads[k] = [p.grad.clone() for p in layer.experts.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(*grads.values()))
    used = int(layer.last_expert_ids.unique().numel())
    med = {k: common.median(v) for k, v in times.items()}
    base = med["indexed per expert"]
    print(f"  {dtype_name} {n} tokens, forward + backward: {used} experts used; expert gradients "
          f"{'identical' if same else 'DIFFERENT'}", flush=True)
    return [[dtype_name, n, k, f"{med[k] * 1e3:.1f}", f"{base / med[k]:.2f}x", f"{allocated[k] / 2**20:.0f}"]
            for k in ("indexed per expert", "taken apart once")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 512, 4096], help="tokens per call (1 8 512 4096)")
    p.add_argument("--backward-tokens", nargs="*", type=int, default=[512],
                   help="tokens per forward + backward in the training table (512; none: skip it)")
    p.add_argument("--repeats", type=int, default=7, help="timed samples per implementation and size (7)")
    p.add_argument("--threads", type=int, default=2)
    common.add_model_option(p)
    a = p.parse_args()
    common.setup(a.threads)
    load = common.load_average()
    rows, train_rows = [], []
    for dtype_name in a.dtypes:
        theirs, ours = build(common.DTYPES[dtype_name], a.model)
        for n in a.backward_tokens:
            layer = build(common.DTYPES[dtype_name], a.model)[1].train()
            train_rows += backward_rows(layer, dtype_name, n, a.repeats)
            del layer
        for n in a.tokens:
            x = torch.randn(n, theirs.hidden_dim, generator=torch.Generator().manual_seed(n)).to(common.DTYPES[dtype_name])
            calls = max(1, 64 // n)  # several calls per sample for the tiny inputs
            with torch.no_grad():
                diff = (ours(x).float() - theirs(x)[0].float()).abs().max().item()

                def sample(layer):
                    def go():
                        t = common.timeit(lambda: [layer(x) for _ in range(calls)])
                        return t / calls
                    return go
                times = common.interleaved({"transformers": sample(theirs), "ours": sample(ours)},
                                           a.repeats, warmup=1)
            med = {k: common.median(v) for k, v in times.items()}
            for name in ("transformers", "ours"):
                rows.append([dtype_name, n, name, f"{med[name] * 1e3:.3f}", n / med[name],
                             f"{med['transformers'] / med[name]:.2f}x"])
            print(f"  {dtype_name} {n} tokens: max |ours - transformers| = {diff:.2e}", flush=True)
    common.print_table(
        f"One MoE layer (model {a.model}: dim {theirs.hidden_dim}, 16 experts x 1024 + shared, top-1), median of "
        f"{a.repeats}; "
        f"{common.machine()}; load average {load} -> {common.load_average()}",
        ["dtype", "tokens", "implementation", "ms/call", "tok/s", "vs transformers"], rows)
    if train_rows:
        common.print_table(
            f"Training through our MoE layer: forward + backward, median of {a.repeats}, and the bytes backward "
            f"allocates", ["dtype", "tokens", "expert weights", "ms", "speed-up", "backward allocates MiB"],
            train_rows)


if __name__ == "__main__":
    main()

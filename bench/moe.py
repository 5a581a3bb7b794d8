"""The MoE layer alone: our grouped dispatch vs transformers' `Llama4TextMoe` (every expert on every token).

One MoE layer of the benchmark model (dim 512, 16 experts of width 1024, top-1, plus the shared expert) is
built by transformers with its own initialization; ours gets the same weights (gate_up_proj split into
w1 / w3). Inputs of decode size (1 and 8 tokens) and prefill size (512 and 4096 tokens) go through both,
alternating; the table shows the median time per call and the tokens/s it means. Every expert runs on
every token in transformers' layer (zeros for the unchosen), so its cost does not fall with top-1 routing;
ours multiplies each token by its chosen expert only.

    python bench/moe.py
    python bench/moe.py --tokens 1 4096 --dtypes fp32
"""
from __future__ import annotations

import argparse

import common  # first: sets up OpenMP before torch loads, and puts the project's moe.py ahead of this file
import torch
from moe import MoE


@torch.no_grad()
def build(dtype: torch.dtype, seed: int = 0):
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = common.hf_config()
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 512, 4096], help="tokens per call (1 8 512 4096)")
    p.add_argument("--repeats", type=int, default=7, help="timed samples per implementation and size (7)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    common.setup(a.threads)
    load = common.load_average()
    rows = []
    for dtype_name in a.dtypes:
        theirs, ours = build(common.DTYPES[dtype_name])
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
        f"One MoE layer (dim 512, 16 experts x 1024 + shared, top-1), median of {a.repeats}; "
        f"{common.machine()}; load average {load} -> {common.load_average()}",
        ["dtype", "tokens", "implementation", "ms/call", "tok/s", "vs transformers"], rows)


if __name__ == "__main__":
    main()

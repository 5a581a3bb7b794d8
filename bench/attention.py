"""Chunked attention from position 0 (training, prefill): chunk by chunk vs all T x T scores under a mask.

On RoPE layers Llama 4 attends only inside chunks aligned to position 0 (8192 tokens in Scout). When every row
is one unpadded sequence from position 0 with nothing cached (training, the prefill of a prompt), model.py
stacks the whole chunks as a batch and lets SDPA compute each chunk's causal triangle
(`model.causal_in_chunks`). The alternative, what it did before and what the masked path still does for
padded or cached input, is SDPA over all T x T scores with a boolean (B, 1, T, T) chunk mask: T / chunk times
the work, plus the mask. Ours alone (transformers' attention is not a separable function); both are timed
alternately, in the dtype attention runs in on the CPU (fp32), forward alone (prefill) and forward + backward
(training), and their outputs compared.

    python bench/attention.py
    python bench/attention.py --repeats 3
"""
from __future__ import annotations

import argparse

import common  # first: puts the project on the path
import torch
import torch.nn.functional as F

# (batch, tokens, chunk, heads, kv heads, head dim, backward too): the debug flavor's training step, then
# longer sequences with Llama 4's head size
CASES = [(8, 256, 128, 8, 2, 32, True), (1, 1024, 128, 8, 2, 128, True), (1, 4096, 1024, 8, 2, 128, True),
         (1, 8192, 2048, 8, 2, 128, False)]


def one_case(B, T, chunk, H, Hkv, D, backward, repeats) -> list[list]:
    from model import attention_mask, causal_in_chunks

    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=backward)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, requires_grad=backward) for _ in range(2))
    pos = torch.arange(T)[None].expand(B, T)
    mask = attention_mask(pos, pos, chunk)  # (B, 1, T, T)
    ways = {"chunk by chunk": lambda: causal_in_chunks(q, k, v, chunk),
            "T x T under a mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)}
    with torch.no_grad():
        diff = (ways["chunk by chunk"]() - ways["T x T under a mask"]()).abs().max().item()
    rows = []
    passes = [("forward", False)] + ([("forward + backward", True)] if backward else [])
    for name, with_grad in passes:
        def run(f, with_grad=with_grad):
            def go():
                if with_grad:
                    f().sum().backward()
                else:
                    with torch.no_grad():
                        f()
            return go
        times = common.interleaved({w: run(f) for w, f in ways.items()}, repeats, warmup=1)
        ms = {w: 1e3 * common.median(t) for w, t in times.items()}
        rows.append([f"{B} x {T}", chunk, f"{H}/{Hkv} x {D}", name, f"{ms['chunk by chunk']:.2f}",
                     f"{ms['T x T under a mask']:.2f}", f"{ms['T x T under a mask'] / ms['chunk by chunk']:.2f}x",
                     f"{diff:.1e}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="timed runs per way and case (7)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    common.setup(a.threads)
    load = common.load_average()
    rows = []
    for case in CASES:
        rows += one_case(*case, a.repeats)
    common.print_table(
        f"Chunked causal attention, fp32, ms (median of {a.repeats}); {common.machine()}; "
        f"load average {load} -> {common.load_average()}",
        ["batch x tokens", "chunk", "heads/kv x dim", "pass", "chunk by chunk ms", "under a mask ms", "speed-up",
         "max |diff|"], rows)


if __name__ == "__main__":
    main()

"""Training speed: tokens/s of one step (forward + cross-entropy + backward + AdamW) on the debug flavor.

transformers gets the same configuration as a `Llama4ForCausalLM` (dim 256, 4 layers, 8 experts top-1 on
layers 1 and 3, 128-token attention chunks, layer 3 NoPE); its randomly initialized weights are saved with
`save_pretrained` and loaded by both. Each step: logits for a (batch, seq) block of tokens, the next-token
cross-entropy computed the same way for both (outside the model, in fp32), backward, `AdamW.step()`,
`zero_grad()`. Steps alternate between the two models; the table shows medians. Ours runs a second time as
it was before `moe.Experts.taken_apart` (expert weights indexed per expert, w1[e]: backward then builds a
gradient of the whole expert stack's size for every expert used), to show what that change buys here.

    python bench/train_step.py
    python bench/train_step.py --batch 4 --seq 512 --dtypes fp32
"""
from __future__ import annotations

import argparse
import contextlib

import common  # first: puts the project on the path
import torch
import torch.nn.functional as F


def step_fn(model, tokens, logits_of, context=contextlib.nullcontext):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with context():
            logits = logits_of(model, tokens[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def main() -> None:
    from model import FLAVORS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES),
                   help="dtype of the weights (bf16: pure bf16 training, optimizer state included)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="tokens per row (256: two attention chunks)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (5)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    common.setup(a.threads)
    load = common.load_average()
    args = FLAVORS["debug"]
    tmp, path = common.temp_checkpoint(common.hf_config_from_args(args))
    rows = []
    with tmp:
        for dtype_name in a.dtypes:
            dtype = common.DTYPES[dtype_name]
            hf, ours = common.load_theirs(path, dtype).train(), common.load_ours(path, dtype).train()
            before = common.load_ours(path, dtype).train()
            tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = (ours(tokens).float() - hf(input_ids=tokens).logits.float()).abs().max().item()
            runs = {"transformers": step_fn(hf, tokens, lambda m, t: m(input_ids=t).logits),
                    "ours": step_fn(ours, tokens, lambda m, t: m(t)),
                    "ours, experts indexed per expert (before)":
                        step_fn(before, tokens, lambda m, t: m(t), common.experts_indexed_per_expert)}
            times = common.interleaved(runs, a.repeats, warmup=1)  # the first step creates AdamW's state
            tps = {k: a.batch * a.seq / common.median(v) for k, v in times.items()}
            for name in runs:
                rows.append([dtype_name, f"{a.batch} x {a.seq}", name, tps[name],
                             f"{tps[name] / tps['transformers']:.2f}x"])
            print(f"  {dtype_name}: max |logits ours - transformers| before training = {diff:.2e}", flush=True)
            del hf, ours, before, runs
    common.print_table(
        f"Training step (forward + backward + AdamW), debug flavor, tokens/s (median of {a.repeats}); "
        f"{common.machine()}; load average {load} -> {common.load_average()}",
        ["dtype", "batch x seq", "implementation", "tok/s", "vs transformers"], rows)


if __name__ == "__main__":
    main()

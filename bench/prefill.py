"""Prefill speed: tokens/s for a 512- and a 4096-token prompt, ours vs transformers, fp32 and bf16.

Both implementations load the same checkpoint (bench/common.py) and do what generation does with a prompt:
one forward over it that fills a fresh KV cache and returns the next token's logits (ours:
`generate.prefill`; transformers: a forward with a new `DynamicCache` and `logits_to_keep=1`, as its
`generate` does). Ours runs three times: as `checkpoint.load_model` returns it, as generate.py loads it on the
CPU (`for_decode=True`: weights fused and packed by cpu_decode.py), and as `generate.py --compile` loads it
(`compile=True`: fused, not packed; the prompt runs the eager model, only single decoded tokens the compiled
graph). Runs alternate; the table shows medians.

    python bench/prefill.py
    python bench/prefill.py --lengths 512 --dtypes fp32 --repeats 3
"""
from __future__ import annotations

import argparse

import common  # first: puts the project on the path
import torch


def prefill_theirs(hf, prompt):
    from transformers import DynamicCache

    with torch.no_grad():
        return hf(input_ids=prompt, past_key_values=DynamicCache(config=hf.config), use_cache=True,
                  logits_to_keep=1).logits[:, -1]


def prefill_ours(model, prompt):
    import generate

    with torch.no_grad():
        return generate.prefill(model, model.make_cache(prompt.shape[0], prompt.shape[1] + 1), prompt.tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 4096], help="prompt lengths (512 4096)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation and length (3)")
    p.add_argument("--threads", type=int, default=2)
    common.add_model_option(p)
    a = p.parse_args()
    load, tmp, path = common.start(a)
    rows = []
    with tmp:
        for dtype_name in a.dtypes:
            dtype = common.DTYPES[dtype_name]
            hf, ours = common.load_theirs(path, dtype), common.load_ours(path, dtype)
            import checkpoint
            prepared = checkpoint.load_model(path, dtype=dtype, for_decode=True)
            unpacked = checkpoint.load_model(path, dtype=dtype, for_decode=True, compile=True)
            models = {"ours": ours, "for_decode": prepared, "compile": unpacked}
            for i, T in enumerate(a.lengths):
                prompt = torch.randint(0, hf.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
                want = prefill_theirs(hf, prompt).float()
                diff = {name: (prefill_ours(m, prompt).float() - want).abs().max().item() for name, m in models.items()}
                runs = {name: (lambda m=m, p=prompt: prefill_ours(m, p)) for name, m in models.items()}
                times = common.interleaved({"transformers": lambda hf=hf, p=prompt: prefill_theirs(hf, p), **runs},
                                           a.repeats, warmup=0)  # the agreement check above warmed all up
                tps = {k: T / common.median(v) for k, v in times.items()}
                for name, label in (("transformers", "transformers"), ("ours", "ours, as loaded"),
                                    ("for_decode", "ours, for_decode (generate.py)"),
                                    ("compile", "ours, compile=True (--compile)")):
                    rows.append([dtype_name, T, label, tps[name], f"{tps[name] / tps['transformers']:.2f}x"])
                print(f"  {dtype_name} {T} tokens: max |logits - transformers'|: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()), flush=True)
            del hf, ours, prepared, unpacked, models
    common.print_table(
        f"Prefill, model {a.model}, tokens/s (batch 1, median of {a.repeats}); {common.machine()}; "
        f"load average {load} -> {common.load_average()}",
        ["dtype", "prompt tokens", "implementation", "tok/s", "vs transformers"], rows)


if __name__ == "__main__":
    main()

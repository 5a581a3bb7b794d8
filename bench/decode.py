"""Decode speed: tokens/s at batch 1 and 8 after a 512-token prompt, ours vs transformers, fp32 and bf16.

Both implementations load the same checkpoint (bench/common.py) and run the same greedy loop: one forward
over the prompt fills a KV cache (not timed), then each step feeds the token just chosen. The cache right
after the prompt is kept aside and put back before every timed segment of --steps tokens, so every segment
decodes positions 512, 513, ...; segments alternate between the two implementations.

Each row also prints gpt-fast's "bandwidth achieved": decoding is bound by reading weights, so
  bound (tok/s) = batch * memory bandwidth / bytes of weights one step must read,
where the bytes are the active parameters (every weight but the embedding table and the routed experts no
token chose; at batch 8 the distinct experts actually used, counted per layer) times bytes per parameter,
and the bandwidth is measured here, interleaved with the decoding runs (the larger of a big copy and a big
matrix-vector product, median of the samples).
transformers runs every expert on every token, so it reads all of them. A last column runs only our step's
weight matrix products, back to back: the ceiling that PyTorch's kernels set for any code around them.
Ours runs twice: as `checkpoint.load_model` returns it, and after `cpu_decode.prepare_for_decode` (the products
that share an input fused into one, each weight packed once into oneDNN's layout; what generate.py runs on
the CPU); at batch 1 also a third time, with `prepare_for_decode(..., compile=True)` (what `generate.py
--compile` runs: one compiled graph per token, `cpu_decode.CompiledSteps`; compiled in the untimed segment).

    python bench/decode.py                  # fp32 and bf16, batch 1 and 8
    python bench/decode.py --dtypes fp32 --batches 1 --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import time

import common  # first: puts the project on the path
import torch


@torch.no_grad()
def prefill_theirs(hf, prompt):
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    logits = hf(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return cache, logits.argmax(-1)


@torch.no_grad()
def decode_theirs(hf, cache, token, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        logits = hf(input_ids=token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1)
        out.append(token)
    return torch.stack(out, 1)


@torch.no_grad()
def prefill_ours(model, prompt, steps: int):
    cache = model.make_cache(prompt.shape[0], prompt.shape[1] + steps + 1)
    return cache, model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1)


@torch.no_grad()
def decode_ours(model, cache, token, steps: int, experts_used: list | None = None):
    out = []
    for _ in range(steps):
        token = model(token[:, None], cache=cache, last_only=True)[:, -1].argmax(-1)
        out.append(token)
        if experts_used is not None:
            experts_used.append([l.feed_forward.last_expert_ids.unique().numel() for l in model.layers
                                 if hasattr(l.feed_forward, "experts")])
    return torch.stack(out, 1)


def swiglu_products(ff, D: int) -> list:
    """(input width, product) of a dense SwiGLU or shared expert: w1, w3, w2, or w1|w3 fused and w2."""
    if ff.w13 is not None:
        return [(D, ff.w13), (ff.w2.in_features, ff.w2)]
    return [(D, ff.w1), (D, ff.w3), (ff.w2.in_features, ff.w2)]


def expert_products(experts, e: int, D: int) -> list:
    if experts.fused is not None:  # cpu_decode: (w1|w3, w2)
        w13, w2 = experts.fused[e]
        return [(D, w13), (w2.in_features, w2)]
    w1, w3, w2 = experts.w1[e], experts.w3[e], experts.w2[e]
    return [(D, lambda x, w=w1: x @ w), (D, lambda x, w=w3: x @ w), (w2.shape[0], lambda x, w=w2: x @ w)]


@torch.no_grad()
def matmuls_alone(model, batch: int, distinct: list[float], steps: int):
    """A callable that runs, `steps` times, only the weight matrix products of one decoding step of our
    `model` -- the same weights, shapes, layouts and kernels (plain or prepared by cpu_decode), round(distinct)
    experts per MoE layer sharing the batch's rows -- and nothing else: no attention, norms, routing or
    Python modules around them. What PyTorch's own kernels reach on these weights."""
    dtype = model.tok_embeddings.weight.dtype
    D = model.args.dim
    calls = []
    experts_used = iter(distinct)
    for layer in model.layers:
        a, ff = layer.attention, layer.feed_forward
        calls += [(D, a.wqkv)] if a.wqkv is not None else [(D, a.wq), (D, a.wk), (D, a.wv)]
        calls.append((a.wo.in_features, a.wo))
        if hasattr(ff, "experts"):
            calls += [(D, ff.router)] + swiglu_products(ff.shared_expert, D)
            used = max(1, round(next(experts_used)))
            rows = max(1, -(-batch // used))  # the batch's rows shared among the experts used
            calls += [(width, p, rows) for e in range(used) for width, p in expert_products(ff.experts, e, D)]
        else:
            calls += swiglu_products(ff, D)
    calls.append((D, model.output))
    calls = [c if len(c) == 3 else (*c, batch) for c in calls]
    xs = {width: torch.randn(batch, width, dtype=dtype) for width, _, _ in calls}

    def go():
        for _ in range(steps):
            for width, product, rows in calls:
                product(xs[width][:rows])
    return go


def bench_one(path, dtype_name: str, batch: int, a) -> list[list]:
    from cpu_decode import prepare_for_decode

    dtype = common.DTYPES[dtype_name]
    hf, ours = common.load_theirs(path, dtype), common.load_ours(path, dtype)
    prepared = prepare_for_decode(common.load_ours(path, dtype))
    compiled = prepare_for_decode(common.load_ours(path, dtype), compile=True) if batch == 1 else None
    prompt = torch.randint(0, hf.config.vocab_size, (batch, a.prompt), generator=torch.Generator().manual_seed(batch))
    hf_cache, hf_first = prefill_theirs(hf, prompt)
    our_cache, our_first = prefill_ours(ours, prompt, a.steps)
    prep_cache, prep_first = prefill_ours(prepared, prompt, a.steps)

    def run(decode, model, cache, first):
        def go():
            c = copy.deepcopy(cache)
            return common.timeit(lambda: decode(model, c, first, a.steps))
        return go

    # One untimed segment each: warms up, checks agreement, counts the experts ours actually reads.
    used: list[list[int]] = []
    ours_tokens = decode_ours(ours, copy.deepcopy(our_cache), our_first, a.steps, used)
    theirs_tokens = decode_theirs(hf, copy.deepcopy(hf_cache), hf_first, a.steps)
    prep_tokens = decode_ours(prepared, copy.deepcopy(prep_cache), prep_first, a.steps)
    agree = (torch.cat([our_first[:, None], ours_tokens], 1) == torch.cat([hf_first[:, None], theirs_tokens], 1))
    same = torch.equal(torch.cat([our_first[:, None], ours_tokens], 1), torch.cat([prep_first[:, None], prep_tokens], 1))
    runs = {}
    if compiled is not None:
        comp_cache, comp_first = prefill_ours(compiled, prompt, a.steps)
        t0 = time.perf_counter()
        comp_tokens = decode_ours(compiled, copy.deepcopy(comp_cache), comp_first, a.steps)  # compiles the step
        agree_c = torch.cat([comp_first[:, None], comp_tokens], 1) == torch.cat([hf_first[:, None], theirs_tokens], 1)
        print(f"  {dtype_name} batch 1: the compiled step took {time.perf_counter() - t0:.0f} s to compile and run "
              f"{a.steps} steps; its greedy tokens agree with transformers' {int(agree_c.sum())}/{agree_c.numel()}",
              flush=True)
        runs["compiled"] = run(decode_ours, compiled, comp_cache, comp_first)
    distinct = [sum(step[i] for step in used) / len(used) for i in range(len(used[0]))]
    bytes_step = common.weight_bytes_per_step(ours, distinct)

    times = common.interleaved({"transformers": run(decode_theirs, hf, hf_cache, hf_first),
                                "ours": run(decode_ours, ours, our_cache, our_first),
                                "prepared": run(decode_ours, prepared, prep_cache, prep_first), **runs,
                                "matmuls ours": matmuls_alone(ours, batch, distinct, a.steps),
                                "matmuls prepared": matmuls_alone(prepared, batch, distinct, a.steps),
                                "bandwidth": lambda: max(common.bandwidth_probe().values())}, a.repeats, warmup=1)
    bandwidth = common.median(times.pop("bandwidth"))  # GB/s
    bound = batch * bandwidth * 1e9 / bytes_step
    tps = {k: batch * a.steps / common.median(v) for k, v in times.items()}
    every_weight = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if n != "tok_embeddings.weight")
    rows = []
    for name, label in (("transformers", "transformers"), ("ours", "ours, as loaded"),
                        ("prepared", "ours, prepare_for_decode"), ("compiled", "ours, compiled (--compile)")):
        if name not in tps:
            continue
        matmuls = f"{tps['matmuls ' + name]:.0f}" if "matmuls " + name in tps else ""
        rows.append([dtype_name, batch, label, tps[name], f"{tps[name] / tps['transformers']:.2f}x",
                     f"{bytes_step / 1e6:.0f}", f"{bandwidth:.1f}", f"{bound:.0f}", f"{100 * tps[name] / bound:.0f}%",
                     matmuls])
    print(f"  {dtype_name} batch {batch}: greedy tokens agree {int(agree.sum())}/{agree.numel()} "
          f"({'same' if same else 'NOT the same'} after prepare_for_decode); "
          f"distinct experts per layer {sum(distinct) / len(distinct):.2f}; transformers reads "
          f"{every_weight / 1e6:.0f} MB/step (every expert)", flush=True)
    del hf, ours, prepared, compiled
    return rows


def add_decode_options(p) -> None:
    """The options of a decoding benchmark (this script's, and bench/decode_breakdown.py's)."""
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES))
    p.add_argument("--prompt", type=int, default=512, help="prompt length in tokens (512)")
    p.add_argument("--steps", type=int, default=16, help="decoded tokens per timed segment (16)")
    p.add_argument("--repeats", type=int, default=5, help="timed segments per implementation (5)")
    p.add_argument("--threads", type=int, default=2)
    common.add_model_option(p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    add_decode_options(p)
    a = p.parse_args()
    load, tmp, path = common.start(a)
    rows = []
    with tmp:
        for dtype_name in a.dtypes:
            for batch in a.batches:
                rows += bench_one(path, dtype_name, batch, a)
    common.print_table(
        f"Decode after a {a.prompt}-token prompt, model {a.model}, tokens/s (median of {a.repeats} x {a.steps} "
        f"tokens); "
        f"{common.machine()}; load average {load} -> {common.load_average()}",
        ["dtype", "batch", "implementation", "tok/s", "vs transformers", "MB read/step", "GB/s",
         "bound tok/s", "of bound", "matmuls alone tok/s"], rows,
        ["Bound = batch x memory bandwidth (GB/s: the larger of a 256 MB copy and a 256 MB matrix-vector "
         "read, measured between the runs) / bytes of weights one step must read (active parameters; at batch "
         "> 1 the distinct experts used). Matmuls alone = only our step's weight matrix products, run back to "
         "back: what PyTorch's kernels reach on these weights, the ceiling for any code around them (the "
         "compiled step reads its weights with its own loops instead, cpu_decode.mv)."])


if __name__ == "__main__":
    main()

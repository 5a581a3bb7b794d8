"""Figures that only a GPU can give, in one short run: `python bench/gpu.py` (about 3 minutes on an H200).

What it measures, each against a ceiling measured in the same run:
1. the machine: device-to-device copy bandwidth and a bf16 8192^3 matrix product (TFLOP/s);
2. full-size Scout layers (dim 5120, 40 heads, 16 experts of 8192) in bf16, `--layers` of them with the real
   vocabulary: weight bytes, peak memory of a 4096-token prefill, prefill tokens/s, and decode at batch 1 after
   that prompt, with the bandwidth bound (bytes of weights read per token / measured bandwidth) and the share of
   it achieved, as gpt-fast reports it;
3. the same layers with the routed experts in int4 (torch._weight_int4pack_mm) and FP8 (torch._scaled_mm):
   expert bytes, decode speed, and the logits' relative distance from bf16; then what all 48 Scout layers would
   take under int4, from the measured per-layer bytes -- the "Scout on one 80 GB GPU" claim;
4. streaming load: the bf16 layers saved as a checkpoint, then loaded by `checkpoint.load_model(...,
   device="cuda", quantize="int4")` in a fresh process: time, host peak RSS, GPU peak memory.

Weights are random (N(0, 0.02)): speed and memory do not depend on them, and no real checkpoint is needed.
Prints a markdown table and writes the same figures as JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]

from model import FLAVORS, Transformer, init_weights  # noqa: E402

GB = 1e9


def cuda_time(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() over reps, timed with CUDA events after warm-up runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def machine() -> dict:
    n = 2 * 2**30  # 2 GiB, far beyond the L2
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), reps=10, warmup=2)
    bw = 2 * n / t  # bytes read + bytes written
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = cuda_time(lambda: x @ x, reps=10, warmup=3)
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_GBps=bw / GB,
                bf16_tflops=2 * 8192**3 / t / 1e12)


def build(n_layers: int, seed: int = 0) -> Transformer:
    """Scout's shapes with n_layers layers, random bf16 weights, straight onto the GPU."""
    args = replace(FLAVORS["scout"], n_layers=n_layers, vision=None)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    init_weights(model)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def bytes_per_token(model: Transformer) -> int:
    """Weights one decoded token reads: everything but the routed experts it is not sent to and all but one
    row of the embedding table (quantized experts counted at their packed size)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("tok_embeddings"):
            total += t[0].numel() * t.element_size()
        elif ".experts." in name:
            m = model.args
            total += t.numel() * t.element_size() * m.top_k // m.n_experts
        else:
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def speed(model: Transformer, prompt: torch.Tensor, decode_steps: int = 32) -> dict:
    T = prompt.shape[1]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def run_prefill():
        cache = model.make_cache(1, T + decode_steps + 1)
        return cache, model(prompt, cache=cache, last_only=True)

    t_prefill = cuda_time(lambda: run_prefill(), reps=3)
    peak = torch.cuda.max_memory_allocated() - base
    cache, logits = run_prefill()
    tok = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(decode_steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t_tok = statistics.median(times[2:])
    return dict(prefill_tok_s=T / t_prefill, prefill_peak_GB=peak / GB, decode_tok_s=1 / t_tok,
                decode_ms=t_tok * 1000, last_logits=logits[:, -1].float())


def layer_figures(n_layers: int, prompt_len: int, bw: float) -> list[dict]:
    import quantize

    rows, ref = [], None
    prompt = torch.randint(0, 202048, (1, prompt_len), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for mode in ("bf16", "int4", "fp8"):
        model = build(n_layers)
        if mode != "bf16":
            quantize.quantize_model(model, mode)
            torch.cuda.empty_cache()
        layer = model.layers[model.args.moe_layers[0]]  # Scout: every layer is an MoE layer
        r = dict(mode=mode, weights_GB=weight_bytes(model) / GB,
                 expert_GB_per_layer=weight_bytes(layer.feed_forward.experts) / GB, layer_GB=weight_bytes(layer) / GB,
                 head_GB=(weight_bytes(model.tok_embeddings) + weight_bytes(model.output) + weight_bytes(model.norm)) / GB)
        r.update(speed(model, prompt))
        r["bytes_per_token_GB"] = bytes_per_token(model) / GB
        r["bound_tok_s"] = bw / (r["bytes_per_token_GB"] * GB)
        r["bandwidth_achieved"] = r["decode_tok_s"] / r["bound_tok_s"]
        logits = r.pop("last_logits")
        if ref is None:
            ref = logits
        r["logits_rel_err_vs_bf16"] = ((logits - ref).norm() / ref.norm()).item()
        r["scout48_GB"] = r["head_GB"] + 48 * r["layer_GB"]
        rows.append(r)
        print(json.dumps(r), flush=True)
        del model, layer
        torch.cuda.empty_cache()
    return rows


LOAD_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
import checkpoint

def vm(field):  # this process's memory from /proc (ru_maxrss would carry over the parent's peak through exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / 1e9

torch.cuda.init()
rss0 = vm("VmRSS")
t0 = time.perf_counter()
model = checkpoint.load_model(sys.argv[1], device="cuda", dtype=torch.bfloat16, quantize="int4")
torch.cuda.synchronize()
t = time.perf_counter() - t0
with torch.no_grad():
    model(torch.arange(16, device="cuda")[None])
print(json.dumps(dict(load_s=t, host_peak_rss_GB=vm("VmHWM"), host_rss_before_GB=rss0,
                      gpu_peak_GB=torch.cuda.max_memory_allocated() / 1e9,
                      gpu_after_GB=torch.cuda.memory_allocated() / 1e9)))
"""


def load_figures(n_layers: int, workdir: Path) -> dict:
    import checkpoint

    model = build(n_layers)
    path = workdir / "scout-layers"
    t0 = time.perf_counter()
    checkpoint.save_checkpoint(model, path)
    save_s = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    size = (path / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(path), str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(checkpoint_GB=size / GB, save_s=save_s)
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="full-size Scout layers to build (4: one NoPE layer)")
    p.add_argument("--prompt", type=int, default=4096, help="prefill length before decoding")
    p.add_argument("--skip-load", action="store_true", help="skip the save + streaming-load measurement")
    p.add_argument("--workdir", default=None, help="where to write the temporary checkpoint (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    m = machine()
    print(json.dumps(m), flush=True)
    rows = layer_figures(a.layers, a.prompt, m["copy_GBps"] * GB)
    load = None
    if not a.skip_load:
        with tempfile.TemporaryDirectory(dir=a.workdir) as d:
            load = load_figures(a.layers, Path(d))
    print(f"\n{m['gpu']}, torch {m['torch']}: copy {m['copy_GBps']:.0f} GB/s, bf16 matmul {m['bf16_tflops']:.0f} TFLOP/s")
    print(f"Scout shapes, {a.layers} layers + real vocabulary, prompt {a.prompt} tokens, batch 1\n")
    print("| experts | weights GB | experts GB/layer | prefill tok/s | prefill peak GB | decode tok/s | "
          "read/token GB | bound tok/s | achieved | logits rel. err | 48-layer Scout GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['weights_GB']:.2f} | {r['expert_GB_per_layer']:.3f} | {r['prefill_tok_s']:,.0f} | "
              f"{r['prefill_peak_GB']:.2f} | {r['decode_tok_s']:.1f} | {r['bytes_per_token_GB']:.3f} | "
              f"{r['bound_tok_s']:.0f} | {100 * r['bandwidth_achieved']:.0f}% | {r['logits_rel_err_vs_bf16']:.4f} | "
              f"{r['scout48_GB']:.1f} |")
    if load:
        print(f"\nstreaming int4 load of a {load['checkpoint_GB']:.1f} GB bf16 checkpoint: {load['load_s']:.1f} s, "
              f"host peak RSS {load['host_peak_rss_GB']:.2f} GB (after CUDA init {load['host_rss_before_GB']:.2f} GB), "
              f"GPU peak {load['gpu_peak_GB']:.2f} GB "
              f"(resident {load['gpu_after_GB']:.2f} GB)")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(machine=m, layers=rows, load=load), indent=2))


if __name__ == "__main__":
    main()

"""Loading: wall time and peak resident memory for a ~1 GB checkpoint, ours vs transformers.

The script writes one fp32 checkpoint (the model of bench/common.py: --model wide, 290M parameters, 1.16 GB) with
`save_pretrained` (in a child process, so this one stays small), then loads it many times, each time in a
fresh Python process so that the peak memory belongs to that one load: ours with `checkpoint.load_model`,
theirs with `Llama4ForCausalLM.from_pretrained`. Reported per loader (medians):

- load s: the load call alone, with the file in the page cache (one unmeasured load of each comes first).
  Imports are excluded (`import transformers`, ~3 s; `import checkpoint`); whatever the load itself imports
  lazily counts (ours builds the model on the meta device without importing torch._dynamo, which costs
  ~1.5 s);
- ours is measured four times when the dtype is the stored one: as `load_model` runs by default (zero copy:
  the weights stay views of the memory-mapped file, like transformers'), with `zero_copy=False` (every tensor
  copied into the process's own memory), with `for_decode=True` (what generate.py does on the CPU: the
  text weights fused and packed by cpu_decode.prepare_for_decode, each weight's file pages released once
  packed; the embedding table and the norms stay views), and with `for_decode=True, compile=True` (what
  `generate.py --compile` does: fused, not packed, the experts restacked; the graph compiles later);
- + first read s: the load plus reading every parameter once (a sum). A loader that leaves the weights
  memory-mapped returns quickly and pays when they are first used: this column counts that too;
- peak RSS: the process's high-water mark (VmHWM, after the first read), and the part above the RSS after
  imports, as a multiple of the checkpoint's size on disk. (`getrusage().ru_maxrss` is not used: Linux
  carries it over from the parent process across fork + exec, so a child would report the parent's peak.)

    python bench/load.py
    python bench/load.py --repeats 5 --dtypes fp32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

KIB = 1024


def rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in bytes, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(which: str, path: str, dtype_name: str, threads: int, model: str) -> None:
    """Runs in its own process: import, load, read every weight, print one JSON line."""
    common.setup(threads)
    dtype = common.DTYPES[dtype_name]
    if which.startswith("ours"):
        import checkpoint  # (import cost outside the timing, like transformers' below)
    elif which == "transformers":
        import transformers  # noqa: F401
        transformers.Llama4ForCausalLM  # noqa: B018  (resolve the lazy import now)
    else:  # "write": make the checkpoint
        common.write_checkpoint(common.hf_config(model), path)
        return
    import torch

    base = rss("VmRSS")
    t0 = time.perf_counter()
    if which == "transformers":
        model = common.load_theirs(path, dtype)
    else:
        model = checkpoint.load_model(path, dtype=dtype, zero_copy=which != "ours-copy",
                                      for_decode=which.startswith("ours-for-decode"),
                                      compile=which == "ours-for-decode-compile")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        total = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())  # read every byte once
    touched = time.perf_counter() - t0
    peak = rss("VmHWM")
    if which.startswith("ours-for-decode"):  # the fused (packed) weights are not parameters (and are read already)
        from cpu_decode import packed_weights
        with torch.no_grad():
            total += sum(float(w.to_dense().sum(dtype=torch.float32)) for w in packed_weights(model))
    print(json.dumps(dict(seconds=seconds, touched=touched, peak=peak, base=base, checksum=total)))


def run_child(which: str, path, dtype_name: str, threads: int, model: str = "wide") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, str(path), "--dtype", dtype_name,
           "--threads", str(threads), "--model", model]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if which != "write" else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="measured loads per loader (3)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(common.DTYPES),
                   help="dtypes to load into (fp32 = as stored, bf16 = converted while loading)")
    p.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES), help=argparse.SUPPRESS)  # child
    p.add_argument("--threads", type=int, default=2)
    common.add_model_option(p)
    p.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.dtype, a.threads, a.model)
    common.setup(a.threads)
    load = common.load_average()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="llama4-bench-") as tmp:
        path = Path(tmp)
        run_child("write", path, "fp32", a.threads, a.model)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for dtype_name in a.dtypes:
            loaders = ["transformers", "ours"] + (["ours-copy", "ours-for-decode", "ours-for-decode-compile"]
                                                  if dtype_name == "fp32" else [])
            results = common.interleaved({w: (lambda w=w: run_child(w, path, dtype_name, a.threads))
                                          for w in loaders}, a.repeats, warmup=1)
            sums = {}
            for name in loaders:
                runs = results[name]
                sums[name] = runs[0]["checksum"]
                med = {k: common.median([r[k] for r in runs]) for k in ("seconds", "touched", "peak")}
                above = common.median([r["peak"] - r["base"] for r in runs])
                label = {"ours": "ours" if dtype_name != "fp32" else "ours, zero copy", "ours-copy": "ours, copy",
                         "ours-for-decode": "ours, for_decode", "ours-for-decode-compile": "ours, for_decode + compile"}
                rows.append([dtype_name, label.get(name, name), f"{med['seconds']:.2f}", f"{med['touched']:.2f}",
                             f"{med['peak'] / 2**30:.2f}", f"{above / 2**30:.2f}", f"{above / size:.2f}x"])
            ref = sums["transformers"]
            same = all(abs(v - ref) <= 1e-3 * max(1.0, abs(ref)) for v in sums.values())
            notes.append(f"{dtype_name}: sum of all weights after loading {'equal' if same else 'DIFFERENT'} "
                         f"({', '.join(f'{k} {v:.6g}' for k, v in sums.items())}).")
    common.print_table(
        f"Loading a {size / 1e9:.2f} GB fp32 checkpoint (median of {a.repeats}, a fresh process each); "
        f"{common.machine()}; load average {load} -> {common.load_average()}",
        ["into", "loader", "load s", "+ first read s", "peak RSS GiB", "peak above imports GiB",
         "above imports / checkpoint"], rows, notes)


if __name__ == "__main__":
    main()

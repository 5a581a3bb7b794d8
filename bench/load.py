"""Loading: wall time and peak resident memory for a ~1 GB checkpoint, ours vs transformers.

The script writes one fp32 checkpoint (the 252M-parameter model of bench/common.py, 1.0 GB) with
`save_pretrained` (in a child process, so this one stays small), then loads it many times, each time in a
fresh Python process so that the peak memory belongs to that one load: ours with `checkpoint.load_model`,
theirs with `Llama4ForCausalLM.from_pretrained`. Reported per loader (medians):

- load s: the load call alone (imports excluded), with the file in the page cache (one unmeasured load of
  each comes first);
- + first read s: the load plus reading every parameter once (a sum). A loader that leaves the weights
  memory-mapped returns quickly and pays when they are first used: this column counts that too;
- peak RSS: the process's high-water mark (VmHWM, after the first read), and the part above the RSS after
  imports, as a multiple of the checkpoint's size on disk. (`getrusage().ru_maxrss` is not used: Linux
  carries it over from the parent process across fork + exec, so a child would report the parent's peak.)

    python bench/load.py
    python bench/load.py --repeats 5 --dtype bf16
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


def child(which: str, path: str, dtype_name: str, threads: int) -> None:
    """Runs in its own process: import, load, read every weight, print one JSON line."""
    common.setup(threads)
    dtype = common.DTYPES[dtype_name]
    if which == "ours":
        import checkpoint  # noqa: F401  (import cost outside the timing, like transformers' below)
    elif which == "transformers":
        import transformers  # noqa: F401
        transformers.Llama4ForCausalLM  # noqa: B018  (resolve the lazy import now)
    else:  # "write": make the checkpoint
        common.write_checkpoint(common.hf_config(), path)
        return
    import torch

    base = rss("VmRSS")
    t0 = time.perf_counter()
    model = common.load_ours(path, dtype) if which == "ours" else common.load_theirs(path, dtype)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        total = sum(float(p.float().sum()) for p in model.parameters())  # read every byte once
    touched = time.perf_counter() - t0
    print(json.dumps(dict(seconds=seconds, touched=touched, peak=rss("VmHWM"), base=base, checksum=total)))


def run_child(which: str, path, dtype_name: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, str(path), "--dtype", dtype_name,
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]) if which != "write" else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="measured loads per loader (3)")
    p.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES), help="dtype to load into (fp32 = as stored)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.dtype, a.threads)
    common.setup(a.threads)
    load = common.load_average()
    with tempfile.TemporaryDirectory(prefix="llama4-bench-") as tmp:
        path = Path(tmp)
        run_child("write", path, a.dtype, a.threads)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        results = common.interleaved({w: (lambda w=w: run_child(w, path, a.dtype, a.threads))
                                      for w in ("transformers", "ours")}, a.repeats, warmup=1)
    rows = []
    sums = {}
    for name in ("transformers", "ours"):
        runs = results[name]
        sums[name] = runs[0]["checksum"]
        secs = common.median([r["seconds"] for r in runs])
        touched = common.median([r["touched"] for r in runs])
        peak = common.median([r["peak"] for r in runs])
        above = common.median([r["peak"] - r["base"] for r in runs])
        rows.append([name, f"{secs:.2f}", f"{touched:.2f}", f"{peak / 2**30:.2f}", f"{above / 2**30:.2f}",
                     f"{above / size:.2f}x"])
    same = abs(sums["ours"] - sums["transformers"]) <= 1e-3 * max(1.0, abs(sums["ours"]))
    common.print_table(
        f"Loading a {size / 1e9:.2f} GB fp32 checkpoint into {a.dtype} (median of {a.repeats}, a fresh process "
        f"each); {common.machine()}; load average {load} -> {common.load_average()}",
        ["loader", "load s", "+ first read s", "peak RSS GiB", "peak above imports GiB",
         "above imports / checkpoint"], rows,
        [f"Sum of all weights after loading: {'equal' if same else 'DIFFERENT'} "
         f"(ours {sums['ours']:.6g}, transformers {sums['transformers']:.6g})."])


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks in bench/: the model they run, timing, tables, memory bandwidth.

Every benchmark compares this project against transformers' `Llama4ForCausalLM` *on the same checkpoint*:
the script builds a randomly initialized transformers model, writes it once with `save_pretrained` into a
temporary directory, and both implementations load that directory (theirs with `from_pretrained`, ours
with `checkpoint.load_model`). Timings alternate between the two (A B B A ...) so that a noisy neighbour
on a shared machine slows both alike, and every number reported is a median over repetitions.

The model (`MODELS`, chosen with --model) is sized for a 2-core CPU so that reading weights dominates
decoding. "wide" (the default): dim 1024, 4 layers, heads of 128 (Llama 4's head size), 16 experts top-1 with
MoE on every layer (Scout's layout), vocab 32000 -- 290M parameters, 69M of them read per decoded token (the
embedding table excluded: a token reads one row). "narrow": the model of the tables before 2026-11-28, the
same budget as 8 layers of dim 512 with heads of 64 (252M, 47M read per token).
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

# OpenMP's wait policy is left as the user has it (libgomp's default: a waiting worker spins a while, then
# sleeps), because that is what `python generate.py` runs with. It matters: with OMP_WAIT_POLICY=PASSIVE
# (sleep at once) each oneDNN product pays a thread wake-up, ~100 us on this 2-core machine, as much as
# reading a 4 MB weight, so decoding ran 30-42% slower (bench/README.md). On a machine busy with other
# jobs, spinning workers can make small parallel ops wait for a scheduler slice instead: export
# OMP_WAIT_POLICY=PASSIVE there. Every table's title says which policy it ran under.

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# `python bench/NAME.py` from anywhere: the project's modules come first on the path (bench/moe.py must not
# shadow the project's moe.py).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The decode/prefill/load/MoE models, as transformers config fields (Llama4TextConfig). Both: RoPE as Scout's
# (Meta's 16/1/1 llama3 scaling, theta 5e5), 8192-token attention chunks, every 4th layer NoPE (3, 7), QK-norm,
# 16 experts of width 1024, top-1, plus the shared expert, on every layer. They differ in shape only:
# at width 512 a decoding step is 57 products of 1-4 MB, each run at 40-60% of the machine's bandwidth, and
# the ops between them (norms, RoPE, the cache, attention: ~0.7 ms a layer) took 40% of the step, so the
# "narrow" model measured per-op overhead more than the weight reads the bound is about. "wide" halves the
# layers and doubles the width: ~300M parameters as the bench issue asks, in products of 2-8 MB.
_COMMON = dict(vocab_size=32000, intermediate_size=1024, intermediate_size_mlp=2048, num_attention_heads=8,
               num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
               use_qk_norm=True, attention_chunk_size=8192, max_position_embeddings=16384, rms_norm_eps=1e-5,
               rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0,
                                    high_freq_factor=1.0, original_max_position_embeddings=8192))
MODELS = {
    "wide": dict(_COMMON, hidden_size=1024, num_hidden_layers=4, head_dim=128),   # 290M parameters
    "narrow": dict(_COMMON, hidden_size=512, num_hidden_layers=8, head_dim=64),   # 252M parameters
}


def add_model_option(p) -> None:
    p.add_argument("--model", default="wide", choices=list(MODELS),
                   help="wide: dim 1024, 4 layers, heads of 128 (290M parameters; the default); narrow: dim "
                        "512, 8 layers, heads of 64 (252M; the earlier tables' model)")


def setup(threads: int = 2, seed: int = 0) -> None:
    """Same conditions for every benchmark: `threads` intra-op threads, seeded; transformers' warnings about
    Scout's llama3 RoPE settings (low == high frequency factor) and its progress bars silenced."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------------------
# Building and loading the checkpoint both implementations read
# --------------------------------------------------------------------------------------------------------

def hf_config(model: str = "wide", **fields):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(**{**MODELS[model], **fields})


def hf_config_from_args(args):
    """A transformers config for one of our ModelArgs (e.g. model.FLAVORS["debug"])."""
    from transformers import Llama4TextConfig

    rope = dict(rope_type="default", rope_theta=args.rope_theta)
    if args.rope_scaling:
        s = args.rope_scaling
        rope = dict(rope_type="llama3", rope_theta=args.rope_theta, factor=s["factor"],
                    low_freq_factor=s["low_freq_factor"], high_freq_factor=s["high_freq_factor"],
                    original_max_position_embeddings=s["original_context"])
    return Llama4TextConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.moe_hidden_dim,
        intermediate_size_mlp=args.ffn_hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
        num_local_experts=args.n_experts, num_experts_per_tok=args.top_k,
        interleave_moe_layer_step=args.interleave_moe_layer_step, moe_layers=list(args.moe_layers),
        no_rope_layers=[0 if i in args.nope_layers else 1 for i in range(args.n_layers)],
        use_qk_norm=args.use_qk_norm, attention_chunk_size=args.attention_chunk_size,
        attn_temperature_tuning=args.attn_temperature_tuning, floor_scale=int(args.floor_scale),
        attn_scale=args.attn_scale, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_parameters=rope)


def write_checkpoint(cfg, directory: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialized transformers Llama4ForCausalLM (fp32), saved with save_pretrained."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(cfg)
    model.save_pretrained(directory)
    del model
    gc.collect()
    return Path(directory)


def load_theirs(path, dtype: torch.dtype):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def load_ours(path, dtype: torch.dtype):
    import checkpoint

    return checkpoint.load_model(path, dtype=dtype)


def temp_checkpoint(cfg, seed: int = 0) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Write the checkpoint into a fresh temporary directory; keep the returned handle alive while in use."""
    tmp = tempfile.TemporaryDirectory(prefix="llama4-bench-")
    return tmp, write_checkpoint(cfg, tmp.name, seed)


def start(a) -> tuple[str, tempfile.TemporaryDirectory, Path]:
    """What a benchmark of `--model` does first: the common conditions (`--threads`), the load average before
    it runs (for the table's title), and the checkpoint written once for both implementations."""
    setup(a.threads)
    load = load_average()
    return (load, *temp_checkpoint(hf_config(a.model)))


@contextlib.contextmanager
def experts_indexed_per_expert():
    """Our MoE as it was before `Experts.taken_apart`: each expert's weights indexed from the stacks, w1[e],
    so that autograd builds a gradient of a whole stack's size per expert used (for before/after rows)."""
    import moe

    original = moe.Experts.taken_apart
    moe.Experts.taken_apart = lambda self: contextlib.nullcontext()
    try:
        yield
    finally:
        moe.Experts.taken_apart = original


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------

def median(xs) -> float:
    return statistics.median(xs)


def timeit(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list]:
    """Run each callable `warmup` times, then `repeats` times each, alternating A B / B A between rounds.

    A callable may return its own measurement (a number of seconds, or a dict of measurements); if it
    returns anything else (None, a tensor), its wall time is taken. Returns name -> list of measurements.
    """
    names = list(runs)
    for _ in range(warmup):
        for n in names:
            runs[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            got = runs[n]()
            took = time.perf_counter() - t0
            out[n].append(got if isinstance(got, (int, float, dict)) else took)
    return out


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------

def print_table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> None:
    """A Markdown table (ready to paste into a README), columns padded for the terminal."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    print(f"\n{title}\n")
    print(line(cells[0]))
    print("|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|")
    for r in cells[1:]:
        print(line(r))
    for n in notes:
        print(f"\n{n}")
    sys.stdout.flush()


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 10 else f"{c:,.0f}" if abs(c) >= 1000 else f"{c:.1f}"
    return str(c)


def machine() -> str:
    """CPU model name (lscpu), cores, threads used, torch and transformers versions."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import transformers

    return (f"{name}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset: libgomp default')}), "
            f"transformers {transformers.__version__}")


# --------------------------------------------------------------------------------------------------------
# Memory bandwidth and bytes read per token
# --------------------------------------------------------------------------------------------------------

_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _buffers(megabytes: int):
    if megabytes not in _BUFFERS:
        n = megabytes * 2**20 // 4
        _BUFFERS.clear()
        _BUFFERS[megabytes] = (torch.ones(n), torch.empty(n), torch.ones(4096))
    return _BUFFERS[megabytes]


@torch.no_grad()
def bandwidth_probe(megabytes: int = 256) -> dict[str, float]:
    """One sample of this machine's memory bandwidth in GB/s, two ways:

    - copy: `dst.copy_(src)` of a `megabytes` fp32 tensor, counting its bytes read + written;
    - matvec: `W @ v` for an fp32 matrix of `megabytes` (what decoding does), counting W's bytes read.
    The buffers are far larger than the caches, so these are DRAM speeds. Interleave probes with the runs
    they bound, so that a busy neighbour slows both alike.
    """
    src, dst, v = _buffers(megabytes)
    W = src.view(-1, 4096)
    return dict(copy=2 * src.nbytes / timeit(lambda: dst.copy_(src)) / 1e9,
                matvec=W.nbytes / timeit(lambda: W @ v) / 1e9)


def measure_bandwidth(megabytes: int = 256, repeats: int = 9) -> dict[str, float]:
    """Medians of `repeats` bandwidth probes, GB/s, and "best": the larger of the two medians."""
    probes = [bandwidth_probe(megabytes) for _ in range(repeats)]
    out = {k: median([p[k] for p in probes]) for k in ("copy", "matvec")}
    return dict(out, best=max(out.values()))


def load_average() -> str:
    """The 1-minute load average: how busy the machine was (a shared machine makes timings noisy)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def weight_bytes_per_step(model, distinct_experts: list[float]) -> float:
    """Bytes of weights one decoding step of our `model` must read, given the number of distinct experts
    used in each MoE layer: every parameter except the embedding table (one row per token: negligible) and
    except the routed experts nobody chose."""
    from moe import MoE

    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "tok_embeddings.weight")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == len(distinct_experts)
    for m, used in zip(moes, distinct_experts):
        per_expert = sum(p.numel() * p.element_size() for p in m.experts.parameters()) / m.n_experts
        total -= per_expert * (m.n_experts - used)
    return total

"""Training and fine-tuning Llama 4: one readable loop, small enough to run on a laptop CPU.

    python train.py --debug                        # debug flavor from scratch, ~4 min on 2 CPU cores
    python train.py --debug --data my_texts/       # ... on your own text file or directory
    python train.py --debug --resume               # continue the run in out/debug exactly where it stopped
    python train.py --init-from out/debug --sft chats.jsonl --lora 8 --merge-lora --out out/sft
    python train.py --init-from out/debug --sft chats.jsonl --lora 8 --quantize int4 --out out/qlora
    torchrun --nproc-per-node 2 train.py --debug   # one model cut over 2 processes (parallel.py)

The data (data.py; `python data.py` shows them) of `--debug` is on every machine with Python, no download:
CPython's own reference pages and docstrings, 540k tokens of English with the debug tokenizer. The loop is
nanoGPT's: AdamW, linear warmup then cosine decay, gradient clipping, gradient accumulation, bf16 autocast
on CUDA, optional torch.compile, periodic evaluation on the held-out tokens.

What training Llama 4 in particular involves:

1. Mixture of experts without an auxiliary loss. Each MoE layer adds a per-expert bias to the router logits
   when *choosing* experts (never to the gate), and after every optimizer step `moe.update_expert_bias` nudges
   it by +-coeff toward equal load (DeepSeek-V3's scheme, also in torchtitan). The log prints each MoE layer's
   max/mean expert load (1.0 = perfectly even) and `routing.png` shows the load per layer and expert;
   `--balance-coeff 0` turns the balancing off for comparison. The bias moves at most coeff per step, so the
   step must suit the run's length: DeepSeek-V3 and torchtitan use 1e-3 over 100k+ steps; here the default is
   1e-2 (on the debug run at step 80 the two MoE layers' max/mean load was 1.09 / 1.36 with 1e-2, against
   1.72 / 3.02 with 1e-3 and 2.21 / 3.11 with balancing off).
2. Fine-tuning uses the Llama 4 chat format and learns only what the assistant says (the loss mask: see
   data.py). `--lora R` trains adapters (lora.py) with the base, the router and its balancing bias frozen;
   `--quantize int4|fp8` adds QLoRA: the frozen base is stored quantized (routed experts and the adapted
   projections) and the adapters train in full precision. Fine-tuning reads the text model only: a
   multimodal checkpoint's vision weights are neither loaded nor saved.
3. Weight decay (0.1) applies to the matrices that multiply activations: attention, feed-forwards, stacked
   experts, router, output head and LoRA adapters. Norm weights and the token embeddings are not decayed
   (decaying a lookup table only shrinks rare tokens' rows, which get few gradient updates to push back).

Checkpoints (every --eval-interval steps) go to OUT: the model (`model.safetensors` + `llama4.json` +
`tokenizer.model`, read by `generate.py --ckpt OUT`), `trainer.pt` (optimizer, step, RNG, loss history),
`loss.png` and `routing.png`. All of it is written to a staging directory that is then renamed into place, so
a kill -9 at any moment leaves the last complete checkpoint. Batches are a pure function of (seed, step), so
`--resume` continues with exactly the losses an uninterrupted run would have had.

Several processes (`torchrun --nproc-per-node N train.py ...`, one GPU each, or CPU processes with gloo):
the N ranks cut ONE model both ways with parallel.py -- tensor parallelism for attention and the dense and
shared FFNs, expert parallelism for the routed experts -- and there is no data parallelism: every rank
computes on the same batch, and together they take the same steps, with the same losses, as one process. The
whole model is gathered to rank 0 for each checkpoint; rank 0 alone prints. The optimizer state stays cut,
so it is not saved: such a run cannot be resumed, and --lora needs one process.
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import lora
import parallel
import quantize
from data import IGNORE, batch_rng, load_data, load_tokenizer
from model import FLAVORS, ModelArgs, Transformer, init_weights, param_counts
from moe import MoE, keep_dispatch_eager, update_expert_bias

TRAINER_FILE = "trainer.pt"
# settings that may change when resuming (they do not change the numbers of the run)
RESUME_OVERRIDABLE = {"resume", "max_steps", "stop_after", "eval_interval", "eval_batches", "log_interval",
                      "device", "compile", "peak_tflops"}


class TrainError(Exception):
    """Something the trainer cannot go on with; main() prints it as one line."""


# --------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# --------------------------------------------------------------------------------------------------------

def build_model(cfg, resume_dir: Path | None, rank: int = 0, world: int = 1) -> Transformer:
    """From scratch (--flavor), from a checkpoint (--init-from), or from our own run directory (--resume).
    With --lora the base comes from --init-from (quantized with --quantize) and the adapters from the run
    directory when resuming. With world > 1: rank `rank`'s part of the model, cut by parallel.py."""
    source = resume_dir if resume_dir is not None and not cfg.lora else cfg.init_from
    try:
        if source and world > 1:
            model = parallel.load_sharded(source, rank, world, cfg.device, torch.float32)  # reads only our blocks
        elif source:
            model = checkpoint.load_model(source, dtype=torch.float32, quantize=cfg.quantize)
        else:
            # Every rank builds and initializes the whole model from the same seed, then keeps its blocks: fine at
            # debug size. A big model would be built on the meta device, cut, and only its blocks initialized.
            model = Transformer(replace(FLAVORS[cfg.flavor], vision=None))
            init_weights(model)
            parallel.parallelize(model, parallel.Plan(rank, world))  # one process: nothing is cut
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        raise TrainError(f"cannot load {source}: {e}") from None
    if cfg.lora:
        if resume_dir is not None:  # over the same quantization, recorded in adapter_config.json
            lora.load_adapters(model, resume_dir)
        else:
            lora.add_lora(model, cfg.lora, cfg.lora_alpha, cfg.lora_targets.split(","), quantize=cfg.quantize)
    return model.train()


def configure_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW on the trainable parameters: weight decay on matrices, none on norms and the embedding table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name == "tok_embeddings.weight" else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    fused = cfg.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12}


def flops_per_token(a: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B / nanoGPT): 6 x active matmul parameters + attention, whose
    context is the chunk on RoPE layers and the whole sequence on NoPE layers."""
    with torch.device("meta"):  # the whole, uncut model, with no memory: only its parameter counts are used
        n = param_counts(Transformer(a))["active"] - a.vocab_size * a.dim
    ctx = [seq_len if i in a.nope_layers or a.attention_chunk_size is None else min(seq_len, a.attention_chunk_size)
           for i in range(a.n_layers)]
    return 6 * n + sum(12 * a.n_heads * a.head_dim * c for c in ctx)


# --------------------------------------------------------------------------------------------------------
# MoE routing statistics
# --------------------------------------------------------------------------------------------------------

def moe_layers(model: Transformer) -> list[tuple[int, MoE]]:
    return [(i, layer.feed_forward) for i, layer in enumerate(model.layers) if isinstance(layer.feed_forward, MoE)]


def expert_counts(moes: list[tuple[int, MoE]]) -> torch.Tensor:
    """(MoE layers, experts) tokens routed to each expert in the last forward, from MoE.last_expert_ids."""
    return torch.stack([torch.bincount(m.last_expert_ids.flatten().cpu(), minlength=m.n_experts) for _, m in moes]).float()


def imbalance(counts: torch.Tensor) -> list[float]:
    """Per layer: the busiest expert's load over the mean load (1 = even; E = everything to one expert)."""
    return (counts.max(-1).values / counts.mean(-1).clamp(min=1e-9)).tolist()


# --------------------------------------------------------------------------------------------------------
# Evaluation, plots, checkpoints
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, data, cfg, autocast, max_batches) -> tuple[float, torch.Tensor | None]:
    """Mean loss per target token over the held-out batches, and the expert loads they produced."""
    model.eval()
    moes = moe_layers(model)
    total, count, loads = 0.0, 0, None
    for x, y in itertools.islice(data.eval_batches(cfg.batch_size), max_batches):
        x, y = x.to(cfg.device), y.to(cfg.device)
        with autocast:
            logits = model(x)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((y != IGNORE).sum())
        if moes:
            c = expert_counts(moes)
            loads = c if loads is None else loads + c
    model.train()
    return total / max(count, 1), loads


def plot_run(directory: Path, history: dict, baseline: float | None, loads: torch.Tensor | None, moes) -> None:
    from plot import Figure
    fig = Figure(1, 1, title="Llama 4 training: loss per token")
    ax = fig.axes(0, "step", "loss (nats)")
    ax.line(range(1, len(history["train"]) + 1), history["train"], label="train")
    if history["val"]:
        ax.line(*zip(*history["val"]), label="held-out", color=1)
    if baseline is not None:
        ax.hline(baseline, label="unigram entropy")
    fig.save(str(directory / "loss.png"))
    if loads is None:
        return
    fig = Figure(1, 2, title="MoE routing: share of held-out tokens per expert, and load spread during training")
    share = (loads / loads.sum(-1, keepdim=True)).tolist()
    fig.axes(0, "expert", "MoE layer").heatmap(share, [f"layer {i}" for i, _ in moes],
                                               [str(e) for e in range(loads.shape[1])])
    ax = fig.axes(1, "step", "busiest expert / mean load")
    if history["imbalance"]:
        steps, spreads = zip(*history["imbalance"])
        for j, (i, _) in enumerate(moes):
            ax.line(steps, [s[j] for s in spreads], label=f"layer {i}", color=j)
    fig.save(str(directory / "routing.png"))


def recover_run_dir(out: Path) -> None:
    """A kill between the two renames of save_run leaves only OUT's previous version: put it back."""
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.exists():
        os.replace(old, out)


def save_run(out: Path, model, cfg, state: dict, tok_path: Path, plots) -> None:
    """Write the whole checkpoint into a staging directory, then swap it in for OUT (atomically on Linux;
    elsewhere with two renames, and recover_run_dir undoes a kill between them)."""
    recover_run_dir(out)
    staging, old = out.with_name(f".{out.name}.staging"), out.with_name(f".{out.name}.old")
    for leftover in [staging, *out.parent.glob(f".{staging.name}.tmp-*")]:  # from a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    if not cfg.lora or cfg.merge_lora:  # a full model that generate.py and load_model read
        whole = lora.merged_copy(model) if cfg.lora else model
        if getattr(whole, "quantization", None):  # QLoRA: merged projections, routed experts still quantized
            quantize.save_quantized(whole, staging)
        else:
            checkpoint.save_checkpoint(whole, staging)
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok_path, staging / ("tokenizer.json" if tok_path.suffix == ".json" else "tokenizer.model"))
    if cfg.lora:
        lora.save_adapters(model, staging, dict(rank=cfg.lora, alpha=cfg.lora_alpha,
                                                targets=cfg.lora_targets.split(","), base=str(cfg.init_from)))
    with open(staging / TRAINER_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    plots(staging)
    if out.exists() and swap_dirs(staging, out):  # one atomic step: readers never find OUT missing
        shutil.rmtree(staging, ignore_errors=True)  # (it now holds the previous checkpoint)
        return
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def swap_dirs(a: Path, b: Path) -> bool:
    """Exchange two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------

def train_step(fwd, model, optimizer, data, cfg, step: int, autocast, window) -> tuple[float, float]:
    """One optimizer step over cfg.grad_accum micro-batches -> (mean loss, gradient norm before clipping).
    A non-finite loss or gradient norm is returned without updating the weights: the caller stops."""
    total = 0.0
    for micro in range(cfg.grad_accum):
        x, y = data.batch(batch_rng(cfg.seed, step, micro), cfg.batch_size)  # (B, T), (B, T)
        x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
        with autocast:
            logits = fwd(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        if not torch.isfinite(loss):
            return loss.item(), math.nan
        (loss / cfg.grad_accum).backward()
        total += loss.item()
        if window is not None:
            window += expert_counts(moe_layers(model))
    norm = parallel.clip_grad_norm_(model, cfg.grad_clip)  # cut over ranks: the norm of the whole gradient
    if torch.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum, float(norm)


def describe_eval(step: int, val: float, baseline: float | None, loads: torch.Tensor | None, moes) -> str:
    msg = f"eval step {step}: held-out loss {val:.4f}" + (f" (unigram entropy {baseline:.4f})" if baseline else "")
    if loads is not None:
        msg += "\n  held-out tokens per expert (%): " + " | ".join(
            f"L{i}: " + " ".join(f"{100 * v:.0f}" for v in (row / row.sum()).tolist()) for (i, _), row in zip(moes, loads))
    return msg


def train(cfg) -> dict:
    """Run (or resume) training as configured; returns the history {train, val, imbalance, final_val, ...}.
    Under torchrun (a process group is initialized) each rank runs this same loop on its part of the model."""
    out = Path(cfg.out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        recover_run_dir(out)
        state = torch.load(out / TRAINER_FILE, weights_only=True, map_location="cpu")
    tok, tok_path = load_tokenizer(cfg)
    data, baseline = load_data(cfg, tok)
    model = build_model(cfg, out if cfg.resume else None, rank, world).to(cfg.device)
    if model.args.vocab_size < tok.n_words:
        raise TrainError(f"tokenizer has {tok.n_words} ids but the model's vocabulary is {model.args.vocab_size}")
    with torch.device("meta"):
        counts = param_counts(Transformer(model.args))  # of the whole base model, even if cut or quantized
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per token), "
          + (f"{trainable / 1e6:.2f}M trained" if world == 1 else f"cut over {world} ranks: {trainable / 1e6:.2f}M each"))
    optimizer = configure_optimizer(model, cfg)
    step, history, last_saved = 0, dict(train=[], val=[], imbalance=[], unigram=baseline), None
    if cfg.resume:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, history = state["step"], json.loads(state["history"])
        last_saved = step
        print(f"resumed {out} at step {step}")

    cuda = torch.device(cfg.device).type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if cfg.compile:
        keep_dispatch_eager(model)
    fwd = torch.compile(model) if cfg.compile else model
    moes = moe_layers(model)
    window = torch.zeros(len(moes), moes[0][1].n_experts) if moes else None  # expert loads since the last log
    balance = 0.0 if cfg.lora else cfg.balance_coeff  # LoRA keeps the router and its bias frozen
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    flops = flops_per_token(model.args, cfg.seq_len)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else next(
        (v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
    peak = peak and peak * world  # MFU: the job's useful FLOPs over all of its accelerators' peak
    loads = None
    if step == 0:  # where the loss starts: about ln(vocab) for a fresh model
        history["val"].append((0, evaluate(model, data, cfg, autocast, cfg.eval_batches)[0]))
        print(f"eval step 0: held-out loss {history['val'][0][1]:.4f}")
    t_log, n_timed = time.time(), 0

    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(fwd, model, optimizer, data, cfg, step, autocast, window)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            kept = f"{out} (step {last_saved})" if last_saved is not None else "none (none written yet)"
            raise TrainError(f"step {step + 1}: {what}; stopping. The last good checkpoint is {kept}")
        # Nudge the routing biases toward even load (coeff 0: only reset the counts). Under expert parallelism
        # every rank still routes every token (parallel.py), so each rank's tokens_per_expert already holds the
        # global counts: the biases get the same update and stay identical on all ranks.
        update_expert_bias(model, balance)
        step, n_timed = step + 1, n_timed + 1
        history["train"].append(loss)

        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            if cuda:
                torch.cuda.synchronize()
            dt, t_log, n_timed = (time.time() - t_log) / n_timed, time.time(), 0  # seconds per step
            line = (f"step {step:5d}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.2f} | "
                    f"{tokens_per_step / dt:,.0f} tok/s | {dt * 1000:.0f} ms/step")
            if peak:
                line += f" | mfu {100 * flops * tokens_per_step / dt / peak:.1f}%"
            if moes:
                spread = imbalance(window)
                history["imbalance"].append((step, spread))
                line += " | expert load max/mean " + " ".join(f"L{i}:{s:.2f}" for (i, _), s in zip(moes, spread))
                window.zero_()
            print(line)
        stopping = cfg.stop_after is not None and step >= cfg.stop_after
        if step % cfg.eval_interval == 0 or step == cfg.max_steps or stopping:
            val, loads = evaluate(model, data, cfg, autocast, cfg.eval_batches)
            history["val"].append((step, val))
            print(describe_eval(step, val, baseline, loads, moes))
            rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if cuda else [])
            state = dict(step=step, optimizer=optimizer.state_dict() if world == 1 else None, ranks=world, rng=rng,
                         history=json.dumps(history), config=json.dumps(vars(cfg)),
                         data_position=dict(seed=cfg.seed, next_step=step))
            whole = parallel.gather_model(model) if world > 1 else model  # every rank sends its blocks to rank 0
            if rank == 0:
                save_run(out, whole, cfg, state, tok_path, lambda d: plot_run(d, history, baseline, loads, moes))
            if world > 1:
                dist.barrier()  # the other ranks wait until the checkpoint is in place
            last_saved, t_log, n_timed = step, time.time(), 0  # evaluating and saving do not count in tok/s
        if stopping:
            print(f"stopping after step {step} as asked (--stop-after)" + ("; continue with --resume" if world == 1 else ""))
            break
    history["final_val"] = None
    if step == cfg.max_steps:  # the whole held-out set, not just --eval-batches of it
        history["final_val"], _ = evaluate(model, data, cfg, autocast, None)
        print(f"held-out loss on all held-out {'tokens' if baseline else 'conversations'}: {history['final_val']:.4f} "
              "nats" + (f" vs unigram entropy {baseline:.4f} nats" if baseline else ""))
    return history


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train Llama 4 from scratch or fine-tune a checkpoint (full, chat SFT, LoRA).",
        epilog="Fine-tuning: use a smaller --lr than the default for --init-from (e.g. 1e-4 full, 1e-3 LoRA).")
    g = p.add_argument_group("what to train")
    g.add_argument("--debug", action="store_true", help="the debug flavor from scratch on CPython's own "
                   "documentation and docstrings (no download), into out/debug")
    g.add_argument("--flavor", choices=sorted(FLAVORS), help="train this flavor from scratch (see model.py)")
    g.add_argument("--init-from", metavar="DIR", help="start from a checkpoint (Hugging Face, Meta or ours)")
    g.add_argument("--data", metavar="PATH", help="a text file or directory of text files to train on")
    g.add_argument("--sft", metavar="FILE.jsonl", help='chat conversations {"messages": [...]}: loss on assistant tokens only')
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer file (default: debug, the checkpoint's, or Meta's)")
    g.add_argument("--out", metavar="DIR", help="run directory (default out/debug with --debug, else out/run)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", metavar="N", type=int, default=200, help="optimizer steps")
    g.add_argument("--batch-size", metavar="N", type=int, default=10, help="sequences per micro-batch")
    g.add_argument("--seq-len", metavar="T", type=int, default=256, help="tokens per sequence")
    g.add_argument("--grad-accum", metavar="N", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", metavar="LR", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", metavar="R", type=float, default=0.1, help="final learning rate / peak")
    g.add_argument("--warmup-steps", metavar="N", type=int, default=20)
    g.add_argument("--weight-decay", metavar="WD", type=float, default=0.1, help="on matrices only (not norms or embeddings)")
    g.add_argument("--beta1", metavar="B1", type=float, default=0.9)
    g.add_argument("--beta2", metavar="B2", type=float, default=0.95)
    g.add_argument("--grad-clip", metavar="NORM", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", metavar="N", type=int, default=1337, help="initialization and data order")
    g.add_argument("--balance-coeff", metavar="C", type=float, default=1e-2,
                   help="MoE expert-bias step per optimizer step (aux-loss-free balancing; DeepSeek-V3 and "
                   "torchtitan use 1e-3 for runs of 100k+ steps); 0 = off")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", type=int, default=0, metavar="RANK", help="train rank-RANK adapters, base frozen")
    g.add_argument("--lora-alpha", metavar="A", type=float, default=16.0, help="adapter scale is alpha / rank")
    g.add_argument("--lora-targets", metavar="NAMES", default="wq,wv", help=f"comma-separated, from {','.join(lora.LINEAR_TARGETS)}")
    g.add_argument("--merge-lora", action="store_true", help="also save the merged model (readable by generate.py)")
    g.add_argument("--quantize", choices=["int4", "fp8"], help="QLoRA: keep the frozen base quantized (routed "
                   "experts and the adapted projections); the adapters train in full precision")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--val-frac", metavar="F", type=float, default=0.1, help="share of the data held out")
    g.add_argument("--eval-interval", metavar="N", type=int, default=50, help="evaluate and checkpoint every N steps")
    g.add_argument("--eval-batches", metavar="N", type=int, default=4, help="held-out batches per periodic evaluation")
    g.add_argument("--log-interval", metavar="N", type=int, default=10)
    g.add_argument("--stop-after", type=int, metavar="STEP", help="checkpoint and stop after this step, "
                   "as if interrupted (the schedule still runs to --max-steps)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--peak-tflops", metavar="TFLOPS", type=float, help="accelerator peak for the MFU column (known GPUs: auto)")
    return p


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    cfg = make_parser().parse_args(argv)
    if cfg.out is None:
        cfg.out = "out/debug" if cfg.debug else "out/run"
    if cfg.resume and parallel.torchrun_world() > 1:
        raise TrainError("--resume needs one process: a run split over ranks does not save its (cut) optimizer state")
    if cfg.resume:
        path = Path(cfg.out) / TRAINER_FILE
        if not path.is_file() and not Path(cfg.out).with_name(f".{Path(cfg.out).name}.old").is_dir():
            raise TrainError(f"--resume: no {TRAINER_FILE} in {cfg.out}")
        recover_run_dir(Path(cfg.out))
        state = torch.load(path, weights_only=True, map_location="cpu")
        if state["optimizer"] is None:
            raise TrainError(f"--resume: {cfg.out} was trained by {state['ranks']} ranks under torchrun, which do not "
                             f"save the optimizer state; start a new run from it with --init-from {cfg.out}")
        saved = {**vars(make_parser().parse_args([])), **json.loads(state["config"])}  # + options added since
        only_given = make_parser()  # a parser without defaults returns just the options on the command line
        for action in only_given._actions:
            action.default = argparse.SUPPRESS
        explicit = vars(only_given.parse_args(argv))
        clash = {k for k, v in explicit.items() if k not in RESUME_OVERRIDABLE | {"out"} and saved.get(k) != v}
        if clash:
            raise TrainError(f"--resume uses the run's saved settings; these differ: {', '.join(sorted(clash))}")
        saved.update(stop_after=None, **{k: v for k, v in explicit.items() if k in RESUME_OVERRIDABLE})
        return argparse.Namespace(**saved)
    if cfg.debug and not cfg.init_from:
        cfg.flavor = cfg.flavor or "debug"
    if not cfg.flavor and not cfg.init_from:
        raise TrainError("say what to train: --debug, --flavor NAME (from scratch) or --init-from DIR")
    if cfg.flavor and cfg.init_from:
        raise TrainError("--flavor (from scratch) and --init-from (a checkpoint) exclude each other")
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise TrainError(f"--init-from {cfg.init_from}: no such checkpoint directory")
    if cfg.lora and not cfg.init_from:
        raise TrainError("--lora adapts a trained model: give its checkpoint with --init-from DIR")
    if cfg.quantize and not cfg.lora:
        raise TrainError(f"--quantize {cfg.quantize} is QLoRA: it quantizes the frozen base under --lora RANK adapters")
    if cfg.lora and parallel.torchrun_world() > 1:
        raise TrainError("--lora needs one process (torchrun splits the model over ranks; adapters are not split)")
    if cfg.data and cfg.sft:
        raise TrainError("--data (plain text) and --sft (conversations) exclude each other")
    if cfg.warmup_steps >= cfg.max_steps:
        cfg.warmup_steps = max(1, cfg.max_steps // 10)
    return cfg


def main(argv: list[str] | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # log lines show up at once, even through a pipe
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    try:
        cfg = parse_config(argv)
        if parallel.torchrun_world() > 1:  # N processes, one model cut over them (parallel.py): gloo on CPU, NCCL on GPUs
            _, _, device = parallel.init_distributed()
            cfg.device = str(device)
            if rank > 0:
                sys.stdout = open(os.devnull, "w")  # rank 0 alone prints the log and the evaluations
        t0 = time.time()
        train(cfg)
        print(f"done in {time.time() - t0:.0f} s; checkpoint in {cfg.out}")
    except (TrainError, ValueError, OSError) as e:
        sys.exit(f"error{f' (rank {rank})' if rank else ''}: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

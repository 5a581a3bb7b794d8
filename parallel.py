"""Running Llama 4 on several devices: tensor parallelism and expert parallelism with torch.distributed.

Maverick is ~800 GB in bf16, so it has to be cut into pieces, one per GPU. `parallelize(model, plan)` cuts a
model built by model.py after the fact (model.py knows nothing about it), and `load_sharded` has each rank read
only its own pieces straight from the checkpoint files. Three facts shape the cutting:

1. Tensor parallelism (TP, Megatron style) for everything that computes on every token. Attention is split by
   heads: wq/wk/wv are column-split (rank r holds the rows of heads [r*H/N, (r+1)*H/N) and of their kv heads),
   wo is row-split (the matching input columns), so each rank's attention output is a partial sum over its
   heads, and ONE all-reduce adds the N parts (one per attention, one per feed-forward). Dense SwiGLUs and
   the shared expert are split the same way along their hidden units (w1/w3 column-split, w2 row-split).
   GQA survives the cut because query head h reads kv head h // (H/Hkv), and each rank's heads and kv heads
   are contiguous blocks.
2. Expert parallelism (EP) for the routed experts: rank r holds experts [r*E/N, (r+1)*E/N) whole (Maverick on
   8 GPUs: 16 of the 128 experts each). Routing is top-1 and, after the attention all-reduce, every rank holds
   the same activations and the same router, so every rank routes all tokens identically (bit for bit). Each
   rank then runs only the tokens whose expert it owns and contributes zeros for the others; the MoE layer's
   all-reduce, needed anyway for the shared expert's partial sums, adds each token's one non-zero expert
   output. That is exactly what an all-to-all dispatch computes -- send each token to its expert's owner,
   run it, send it back -- but here "send" costs nothing because the owner already has the token, and "send
   back" is folded into an all-reduce that is paid anyway. What all-to-all would save at scale: when ranks
   hold *different* tokens (data parallelism across EP ranks, or sequence-parallel activations), an
   all-reduce of every token's row would move N times too much; all_to_all_single moves each token only to
   its expert's rank and back (about T*D*(N-1)/N per rank), and no rank spends time routing others' tokens.
   Without EP (TP alone) the experts are split like the shared expert, along their hidden dim.
3. Embeddings and the lm_head are replicated, not vocab-parallel: for Maverick they are 2 x 202048 x 5120
   bf16 = 4.1 GB per rank (4% of a rank's 100 GB on 8 GPUs), and replicated logits mean every rank samples
   the same next token with no gather. Vocab-parallel would save ~3.6 GB per rank for a masked lookup plus
   an all-reduce at the input and an all-gather (or a distributed softmax) at the output. Norms, the router
   and the vision encoder are small and replicated too.

Gradients (train.py) follow Megatron's pair of operators around every split module: `copy_to_ranks` (identity
forward, all-reduce backward: each rank only saw part of the paths from the input) and `sum_over_ranks`
(all-reduce forward, identity backward). The replicated router is the one twist: each rank's experts only see
some tokens, so each rank's router gradient is a partial sum; its weight goes through `copy_to_ranks` too.

NCCL on GPUs and gloo on CPU run the same code; `init_distributed()` reads torchrun's environment.

    torchrun --nproc-per-node 2 parallel.py --ckpt DIR --check    # per-rank memory, logits vs one process
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from checkpoint import Concat, _assign, _stream_meta, detect_layout, fill, load_args, meta_merge, safetensors_stream
from model import Cache, ModelArgs, Transformer, cache_dtype
from moe import Experts, FeedForward, MoE
from storage import CheckpointError, SafetensorsFile


# --------------------------------------------------------------------------------------------------------
# Joining the process group
# --------------------------------------------------------------------------------------------------------

def torchrun_world() -> int:
    """How many processes torchrun started (it sets WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str | None = None, init_method: str | None = None) -> tuple[int, int, torch.device]:
    """Join the job torchrun started (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); return
    (rank, world size, this rank's device). One GPU per rank with NCCL when CUDA is there, else CPU with gloo.
    Without torchrun (no WORLD_SIZE) it is a world of one and nothing is initialized."""
    rank, world = int(os.environ.get("RANK", 0)), torchrun_world()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return rank, world, device


def from_rank0(value):
    """Rank 0's `value` on every rank (e.g. a random seed: all ranks must sample the same tokens)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------------
# Who holds what
# --------------------------------------------------------------------------------------------------------

# Tensor parallelism: (our parameter name, the dim that is cut into N blocks). nn.Linear weights are [out, in].
_TP_DENSE = [
    (r"attention\.w[qkv]\.weight", 0),     # column-split: this rank's heads' rows
    (r"attention\.wo\.weight", 1),         # row-split: those heads' input columns -> a partial sum
    (r"feed_forward\.w[13]\.weight", 0),   # dense SwiGLU: this rank's hidden units ...
    (r"feed_forward\.w2\.weight", 1),      # ... and their columns of the down projection
]
_TP_SHARED = [(r"feed_forward\.shared_expert\.w[13]\.weight", 0), (r"feed_forward\.shared_expert\.w2\.weight", 1)]
_TP_EXPERTS = [(r"feed_forward\.experts\.w[13]", 2), (r"feed_forward\.experts\.w2", 1)]  # (E, D, F), (E, F, D)
_EP_EXPERTS = [(r"feed_forward\.experts\.w[123]", 0)]  # whole experts [r*E/N, (r+1)*E/N)


@dataclass(frozen=True)
class Plan:
    """This rank's place (rank of world, within `group`; None = all ranks) and what is cut.

    tp: attention heads and dense FFNs are split over the ranks (and, without ep, each expert's hidden dim).
    ep: routed experts are split over the ranks, whole.
    The shared expert is split whenever either is on: the MoE layer's all-reduce is there anyway.
    """
    rank: int = 0
    world: int = 1
    tp: bool = True
    ep: bool = True
    group: object = field(default=None, compare=False)

    def shard_dim(self, name: str) -> int | None:
        """Which dim of parameter `name` is cut into `world` blocks (None = every rank holds all of it)."""
        if self.world == 1:
            return None
        rules = _EP_EXPERTS if self.ep else _TP_EXPERTS if self.tp else []
        rules = rules + (_TP_SHARED if self.tp or self.ep else []) + (_TP_DENSE if self.tp else [])
        for pattern, dim in rules:
            if re.fullmatch(r"layers\.\d+\." + pattern, name):
                return dim
        return None

    def narrow(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of the full tensor `name` (a view: nothing is copied or read yet)."""
        d = self.shard_dim(name)
        if d is None:
            return t
        if t.ndim <= d or t.shape[d] % self.world:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)} does not split into {self.world} equal "
                                  f"blocks along dim {d}")
        n = t.shape[d] // self.world
        return t.narrow(d, self.rank * n, n)


def check_plan(args: ModelArgs, plan: Plan) -> None:
    """Clear errors for sizes that do not divide by the number of ranks."""
    N, need = plan.world, []
    if N == 1:
        return
    if args.moe_layers and plan.ep:
        need += [("n_experts", args.n_experts, "expert parallelism gives each rank whole experts")]
    if plan.tp:
        need += [("n_heads", args.n_heads, "tensor parallelism splits the attention heads"),
                 ("n_kv_heads", args.n_kv_heads, "tensor parallelism splits the kv heads"),
                 ("ffn_hidden_dim", args.ffn_hidden_dim, "tensor parallelism splits the dense FFNs")]
    if args.moe_layers and (plan.tp or plan.ep):
        need += [("moe_hidden_dim", args.moe_hidden_dim, "the shared expert is split by its hidden units")]
    for what, n, why in need:
        if n % N:
            raise ValueError(f"{what} = {n} does not split over {N} ranks ({why})")


# --------------------------------------------------------------------------------------------------------
# Megatron's two operators, and the modules that need more than them
# --------------------------------------------------------------------------------------------------------

class _CopyToRanks(torch.autograd.Function):
    """Identity forward. Backward: sum the gradient over ranks, since each rank's part of the model sent back
    only the gradient of its own paths."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce forward: add the ranks' partial results. Backward: identity (d sum / d part = 1), and every
    rank already holds the same, whole, output gradient."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    return _CopyToRanks.apply(x, group)


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    return _SumOverRanks.apply(x, group)


def split_over_ranks(module: nn.Module, group=None) -> None:
    """Mark a module whose ranks each compute a part of the output: its input enters through copy_to_ranks and
    its output leaves through sum_over_ranks. Forward hooks leave the module's code and names untouched."""
    module.register_forward_pre_hook(lambda m, args: (copy_to_ranks(args[0], group), *args[1:]))
    module.register_forward_hook(lambda m, args, out: sum_over_ranks(out, group))


class LocalExperts(Experts):
    """The experts [first, first + n) of a MoE layer, stacked as in moe.Experts (same parameter names).

    MoE.dispatch still routes every token and asks for every chosen expert; for an expert that lives on
    another rank this returns zeros, and that rank adds the real output in the layer's all-reduce.
    """

    def __init__(self, experts: Experts, first: int):
        with torch.device("meta"):  # placeholders, replaced at once by the given (already cut) weights
            super().__init__(*experts.w1.shape)
        self.w1, self.w3, self.w2 = experts.w1, experts.w3, experts.w2
        self.first, self.count = first, experts.w1.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self.first <= e < self.first + self.count:
            return torch.zeros_like(x)  # (n, D): not ours
        return super().expert(e - self.first, x)


class ReplicatedRouter(nn.Module):
    """The router, whole on every rank: logits = x @ W.T. Each rank's experts see only part of the tokens (or
    part of each expert), so each rank's gradient for W is a partial sum: W goes through copy_to_ranks."""

    def __init__(self, router: nn.Linear, group=None):
        super().__init__()
        self.weight, self.group = router.weight, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, copy_to_ranks(self.weight, self.group))


# --------------------------------------------------------------------------------------------------------
# Cutting a model
# --------------------------------------------------------------------------------------------------------

def parallelize(model: Transformer, plan: Plan) -> Transformer:
    """Cut `model` in place to this rank's part. On the meta device this only changes shapes (then load the
    weights with load_sharded); on a real device it keeps this rank's blocks of the weights."""
    args, N = model.args, plan.world
    model.parallel_plan = plan
    if N == 1:
        return model
    check_plan(args, plan)
    for name, p in list(model.named_parameters()):
        if plan.shard_dim(name) is not None:
            _assign(model, name, plan.narrow(name, p.detach()).clone())
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        if plan.tp:
            attn.n_heads, attn.n_kv_heads = args.n_heads // N, args.n_kv_heads // N
            split_over_ranks(attn, plan.group)
            if isinstance(ff, FeedForward):
                split_over_ranks(ff, plan.group)
        if isinstance(ff, MoE) and (plan.tp or plan.ep):
            if plan.ep:
                ff.experts = LocalExperts(ff.experts, first=plan.rank * args.n_experts // N)
            ff.router = ReplicatedRouter(ff.router, plan.group)
            split_over_ranks(ff, plan.group)  # shared expert + routed experts: one all-reduce
    # The KV cache holds this rank's kv heads only.
    local = replace(args, n_heads=args.n_heads // N, n_kv_heads=args.n_kv_heads // N) if plan.tp else args
    emb = model.tok_embeddings  # (its weight is replaced when the shards are loaded: read it at each call)
    model.make_cache = lambda batch, max_len: Cache(local, batch, max_len, cache_dtype(emb.weight), emb.weight.device)
    return model


# --------------------------------------------------------------------------------------------------------
# Loading only this rank's part of a checkpoint
# --------------------------------------------------------------------------------------------------------

def _meta_local(key: str, parts: list[torch.Tensor], args: ModelArgs, plan: Plan, vision: bool):
    """This rank's block(s) of one Meta tensor, given the views of its M model-parallel shards."""
    M, N = len(parts), plan.world
    if plan.ep and N > 1 and ".experts.moe_w_" in key:
        # Every shard stacks the experts along its rows (E*D or E*F/M of them): keep our experts' rows of
        # each shard, then merge their F-slices as usual. Only our E/N experts are ever read.
        n = args.n_experts // N
        rows = parts[0].shape[0] // args.n_experts
        parts = [p[plan.rank * n * rows:(plan.rank + 1) * n * rows] for p in parts]
        return meta_merge(key, parts, replace(args, n_experts=n), vision)
    if M == N and args.n_kv_heads % M == 0:
        # Meta cut the same axes we cut, in the same order: for every tensor we split, shard r IS our block.
        shard_args = replace(args, n_heads=args.n_heads // M, n_kv_heads=args.n_kv_heads // M)
        mine = meta_merge(key, [parts[plan.rank]], shard_args, vision)
        if mine and all(plan.shard_dim(ours) is not None for ours, _ in mine):
            return mine
    merged = meta_merge(key, parts, args, vision)  # resharding: merge this one tensor, keep our block
    return merged and [(ours, plan.narrow(ours, t.join() if isinstance(t, Concat) else t)) for ours, t in merged]


def load_sharded(path: str | os.PathLike, rank: int, world: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, tp: bool = True, ep: bool = True, vision: bool = False,
                 group=None) -> Transformer:
    """Rank `rank` of `world`'s part of the checkpoint at `path` (any layout checkpoint.load_model reads), in
    eval mode. The model is built on the meta device and cut first; then each tensor is cut before it is
    copied, so no rank ever holds the whole model. HF/native safetensors: the cut is a view of the mmapped
    file, so only its pages are read (a row block is contiguous; a column block still touches every row).
    Meta .pth shards: when there are as many as ranks, rank r reads shard r alone for everything it splits;
    otherwise each tensor is merged (experts: only ours) and cut."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    layout = detect_layout(path)
    if layout == "native" and SafetensorsFile(path / "model.safetensors").metadata.get("quantization"):
        raise CheckpointError(f"{path}: a quantized checkpoint cannot be loaded split over ranks "
                              "(load the unquantized one)")
    args = load_args(path, vision=vision)
    plan = Plan(rank, world, tp, ep, group)
    with torch.device("meta"):
        model = parallelize(Transformer(args), plan)
    if layout == "meta":
        mine = lambda key, parts: _meta_local(key, parts, args, plan, vision)  # noqa: E731
        stream = _stream_meta(path, args, vision, merge=mine)
    else:
        stream = ((key, ours, t if ours is None else plan.narrow(ours, t), done)
                  for key, ours, t, done in safetensors_stream(path, layout, vision))
    fill(model, stream, device, dtype, path, where=f"rank {plan.rank} of {plan.world}'s block")
    return model.eval()


def load_model_for_rank(path: str | os.PathLike, dtype: torch.dtype | None = None, tp: bool = True,
                        ep: bool = True, vision: bool = False) -> Transformer:
    """Under torchrun: join the group and load this rank's part onto this rank's device (see load_sharded)."""
    rank, world, device = init_distributed()
    return load_sharded(path, rank, world, device, dtype, tp=tp, ep=ep, vision=vision)


# --------------------------------------------------------------------------------------------------------
# Training helpers: the global gradient norm, and the whole model back for saving
# --------------------------------------------------------------------------------------------------------

def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a cut model: the norm counts every block once and every replicated
    tensor once (replicated gradients are equal on all ranks), so all ranks scale by the same factor."""
    plan = getattr(model, "parallel_plan", None)
    if plan is None or plan.world == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    device = grads[0][1].device if grads else torch.device("cpu")
    split, whole = torch.zeros((), device=device), torch.zeros((), device=device)
    for n, g in grads:
        sq = g.detach().float().pow(2).sum()
        if plan.shard_dim(n) is None:
            whole += sq
        else:
            split += sq
    dist.all_reduce(split, group=plan.group)
    total = (split + whole).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, g in grads:
        g.mul_(scale.to(g.dtype))
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0's CPU (None on the other ranks), gathered block by block.
    Rank 0 can then build a full Transformer on meta, load_state_dict(sd, assign=True) and save_checkpoint."""
    plan: Plan = model.parallel_plan
    out = {}
    for name, t in model.state_dict().items():
        if plan.shard_dim(name) is not None:
            blocks = [torch.empty_like(t) for _ in range(plan.world)]
            dist.all_gather(blocks, t.contiguous(), group=plan.group)
            t = torch.cat(blocks, plan.shard_dim(name))
        if plan.rank == 0:
            out[name] = t.cpu()
    return out if plan.rank == 0 else None


def gather_model(model: Transformer) -> Transformer | None:
    """The whole, uncut model on rank 0's CPU (None elsewhere): what save_checkpoint should be given."""
    state = full_state_dict(model)
    if state is None:
        return None
    with torch.device("meta"):
        whole = Transformer(model.args)
    whole.load_state_dict(state, strict=True, assign=True)
    for m in whole.modules():  # the MoE load counters are bookkeeping, not state
        if isinstance(m, MoE):
            m.tokens_per_expert = torch.zeros(m.n_experts)
    return whole.eval()


def param_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------
# CLI: load a checkpoint across the ranks, report memory, and check against a single process
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Prefill prompt (1, T) into a KV cache, then take `steps` argmax tokens; return them and the logits
    of the prompt (1, T, V)."""
    cache = model.make_cache(1, prompt.shape[1] + steps)
    logits = model(prompt, cache=cache)
    first = logits
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[tokens[-1]]], device=prompt.device), cache=cache)
    return tokens, first


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description="Load a Llama 4 checkpoint split over the ranks of a torchrun job "
                                            "(tensor + expert parallel), print each rank's share of the "
                                            "weights and a greedy continuation of random tokens.",
                                epilog="example: torchrun --nproc-per-node 8 parallel.py --ckpt DIR --dtype bf16")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (Hugging Face, Meta or this project's)")
    p.add_argument("--no-tp", action="store_true", help="keep attention and dense FFNs whole on every rank")
    p.add_argument("--no-ep", action="store_true", help="split each expert's hidden dim instead of the experts")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="weights dtype (default: as stored)")
    p.add_argument("--tokens", type=int, default=16, help="length of the random prompt")
    p.add_argument("--steps", type=int, default=8, help="greedy tokens to generate")
    p.add_argument("--check", action="store_true",
                   help="also load the whole model on rank 0 and compare (small models only)")
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[a.dtype]
    rank, world, device = init_distributed()
    try:
        model = load_sharded(a.ckpt, rank, world, device, dtype, tp=not a.no_tp, ep=not a.no_ep)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error (rank {rank}): {e}")
    print(f"rank {rank}/{world}: {_size(param_bytes(model))} of parameters on {device}", flush=True)
    prompt = torch.randint(0, model.args.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    tokens, logits = greedy(model, prompt, a.steps)
    if rank == 0:
        print(f"greedy tokens: {tokens}")
    if a.check and rank == 0:
        from checkpoint import load_model
        whole = load_model(a.ckpt, device=device, dtype=dtype)
        ref_tokens, ref_logits = greedy(whole, prompt, a.steps)
        diff = (logits.float() - ref_logits.float()).abs().max().item()
        print(f"one process: {_size(param_bytes(whole))}; max |logits diff| {diff:.2e}; "
              f"greedy tokens {'equal' if tokens == ref_tokens else f'DIFFER: {ref_tokens}'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

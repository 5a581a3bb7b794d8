"""Llama 4's mixture-of-experts feed-forward: a router, routed experts and a shared expert.

What makes Llama 4's MoE its own:

1. Top-1 routing on the raw router logits, and the *sigmoid* of the chosen logit (not a softmax over
   experts) is the gate. The gate multiplies the expert's *input*, not its output:
   out = shared_expert(x) + expert_e(sigmoid(logit_e) * x).
2. Every token also goes through one shared expert (a plain SwiGLU of the same width as a routed expert),
   so an MoE layer always costs two expert-sized matmul chains per token: this is the "17B active".
3. The experts are stored stacked, w1/w3 as (E, D, F) and w2 as (E, F, D), used as `x @ w`.

Meta's and Hugging Face's reference code run every expert on every token and multiply the unchosen ones
by zero (transformers #37325). Here only the chosen experts run: tokens are sorted by expert and each expert
multiplies just its own group, one matmul chain per expert that received tokens. At decode time that means
reading exactly one expert's weights per token.

For training, the auxiliary-loss-free balancing of DeepSeek-V3 (as in torchtitan) is built in: a per-expert
bias is added to the logits for *choosing* experts only (the gate uses the unbiased logit) and is nudged
after each optimizer step toward equal load (`update_expert_bias`).

Run `python moe.py` to route a batch through a debug-sized layer and print the expert loads.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def fused_swiglu(w13, w2, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU with w1 (gate) and w3 (up) as one product w13 whose outputs are [gate | up] (cpu_decode.py)."""
    gate, up = w13(x).chunk(2, dim=-1)
    return w2(F.silu(gate) * up)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers, the shared expert (and, stacked, each routed expert)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w13: nn.Module | None = None  # w1 and w3 as one product (cpu_decode.prepare_for_decode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return fused_swiglu(self.w13, self.w2, x)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1, w3 (E, D, F) and w2 (E, F, D), applied as x @ w."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.parts: list[tuple[torch.Tensor, ...]] | None = None  # each expert's (w1, w3, w2), see taken_apart
        self.fused: nn.ModuleList | None = None  # each expert's (w1|w3, w2): cpu_decode.py
        self.stacks: tuple[torch.Tensor, torch.Tensor] | None = None  # unpacked, those as (E, 2F, D), (E, D, F)

    @contextlib.contextmanager
    def taken_apart(self):
        """Within: each expert's weights are the views of one unbind per stack, made once (MoE.dispatch).

        Both ways are views, but backward differs: the gradient of `w1[e]` is a tensor of the whole stack's
        size, zero but for expert e, one per expert used, summed; unbind's gradient stacks them once.
        """
        self.parts = list(zip(self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)))
        try:
            yield
        finally:
            self.parts = None

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x (n, D) -> (n, D). Its weights are views of the stacks: no copy."""
        if self.fused is not None:  # prepared for CPU decoding: gate and up from one product
            return fused_swiglu(*self.fused[e], x)
        w1, w3, w2 = self.parts[e] if self.parts is not None else (self.w1[e], self.w3[e], self.w2[e])
        return (F.silu(x @ w1) * (x @ w3)) @ w2


class MoE(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int = 1):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)  # weight (E, D)
        self.experts = Experts(n_experts, dim, hidden_dim)
        self.shared_expert = FeedForward(dim, hidden_dim)
        # Load balancing state (training): the selection bias is part of the model (it decides routing, so a
        # model trained with it must keep it); the token counts are bookkeeping between optimizer steps.
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts), persistent=False)
        self.last_expert_ids: torch.Tensor | None = None  # (N, k) choices of the last forward, for inspection

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> chosen experts (N, k) and their gates sigmoid(logit) (N, k)."""
        logits = self.router(x)  # (N, E)
        ids = torch.topk(logits + self.expert_bias, self.top_k, dim=-1).indices  # (N, k); bias only chooses
        gates = torch.sigmoid(logits.gather(-1, ids).float()).to(x.dtype)  # unbiased logit -> gate
        return ids, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        ids, gates = self.route(x)  # (N, k), (N, k)
        self.last_expert_ids = ids.detach()
        if self.training:
            self.tokens_per_expert += torch.bincount(ids.flatten(), minlength=self.n_experts).to(self.tokens_per_expert)
        out = self.shared_expert(x)
        out = out + self.dispatch(x, ids, gates)
        return out.reshape(shape)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Run each token through only its chosen experts, grouped by expert.

        The N*k (token, expert) pairs are sorted by expert, so each expert multiplies one contiguous block of
        gated inputs; un-sorting the results puts each pair back in its token's row, and a token's k expert
        outputs are summed.
        """
        N, k = ids.shape
        if N * k == 1:  # one token, one expert (decoding a single sequence): nothing to group
            return self.experts.expert(int(ids), x * gates)
        order = torch.argsort(ids.flatten(), stable=True)  # (N*k,) pairs grouped by expert
        routed_in = x[order // k] * gates.flatten()[order, None]  # (N*k, D): the gate scales the input
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts).tolist()
        outs, start = [], 0
        # Training: take the stacks apart once (see Experts.taken_apart). Without autograd nothing is gained.
        grads = (torch.is_grad_enabled() and isinstance(self.experts, Experts) and self.experts.fused is None
                 and self.experts.w1.requires_grad)
        with self.experts.taken_apart() if grads else contextlib.nullcontext():
            for e, n in enumerate(counts):
                if n:
                    outs.append(self.experts.expert(e, routed_in[start:start + n]))
                    start += n
        if not outs:  # no tokens at all
            return torch.zeros_like(x)
        routed_out = torch.cat(outs)  # (N*k, D), sorted by expert
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(N * k, device=order.device)
        return routed_out[unsort].view(N, k, -1).sum(1)  # (N, D)


def keep_dispatch_eager(model: nn.Module) -> None:
    """Before torch.compile: leave every MoE layer's dispatch loop uncompiled. Its trip counts are the tokens
    per expert, new at every step, and compiled through it was recompiled at every step (train.py --compile:
    4.5 s/step on 2 CPU cores against 1 s eager; 12 s/step on an H200). Not a decorator on `dispatch`:
    torch.compiler.disable imports torch._dynamo (~1.5 s) in every program that imports this file."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.dispatch = torch.compiler.disable(m.dispatch)


@torch.no_grad()
def update_expert_bias(model: nn.Module, coeff: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing, once per optimizer step (DeepSeek-V3 sec. 2.1.2; torchtitan's form).

    Overloaded experts get their selection bias lowered, underloaded ones raised, by a fixed step `coeff`;
    the step is centered so the biases keep mean zero. Then the counts start over.
    """
    for m in model.modules():
        if isinstance(m, MoE) and m.tokens_per_expert.sum() > 0:
            load = m.tokens_per_expert
            delta = coeff * torch.sign(load.mean() - load)
            m.expert_bias += delta - delta.mean()
            m.tokens_per_expert.zero_()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description="Route random tokens through a debug-sized Llama 4 MoE layer.")
    p.add_argument("--flavor", default="debug", help="model flavor whose MoE sizes to use (see model.py)")
    p.add_argument("--tokens", type=int, default=4096, help="number of tokens to route")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write a histogram of the expert loads here")
    a = p.parse_args()
    from model import FLAVORS

    args = FLAVORS[a.flavor]
    torch.manual_seed(a.seed)
    layer = MoE(args.dim, args.moe_hidden_dim, args.n_experts, args.top_k)
    for w in layer.parameters():
        nn.init.normal_(w, std=0.02)
    x = torch.randn(a.tokens, args.dim)
    with torch.no_grad():
        y = layer(x)
    load = torch.bincount(layer.last_expert_ids.flatten(), minlength=args.n_experts)
    print(f"{a.tokens} tokens, {args.n_experts} experts, top-{args.top_k}; output {tuple(y.shape)}")
    print("tokens per expert: " + " ".join(str(int(n)) for n in load))
    # The same result from the naive way the references compute it: every expert on every token.
    dense = layer.shared_expert(x)
    logits = layer.router(x)
    for e in range(args.n_experts):
        chosen = (layer.last_expert_ids == e).any(-1, keepdim=True)
        dense = dense + chosen * layer.experts.expert(e, x * torch.sigmoid(logits[:, e:e + 1]))
    print(f"max |ours - every-expert-on-every-token| = {(y - dense).abs().max().item():.2e}")
    if a.png:
        from plot import Figure

        fig = Figure(1, 1, title=f"Expert load, {a.tokens} random tokens")
        fig.axes(0, "expert", "tokens").bars(load.tolist(), [str(e) for e in range(args.n_experts)])
        fig.save(a.png)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()

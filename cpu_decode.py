"""Decoding on the CPU: the text model's weight products fused and packed for oneDNN.

Generating text reads every active weight once per token, so decoding is bound by memory bandwidth: the
speed of a step is the speed of its matrix-vector products (batch 1) or thin matrix products (small
batches). Two things decide how close PyTorch's CPU kernels come to that bound (measured with
bench/layout.py and bench/decode.py on 2 cores; figures in bench/README.md):

1. The number of products. Each call costs tens of microseconds besides reading its weight, which is as
   long as reading a 512 x 512 matrix. So the products that share an input run as one: wq, wk, wv as one
   `wqkv`; a SwiGLU's w1 (gate) and w3 (up) as one `w13`, for dense layers, the shared expert and each
   routed expert. An MoE layer goes from 11 products to 7 (wqkv, wo, router, and w13 and w2 for the shared
   and the routed expert).
2. The weight's memory layout. oneDNN (PyTorch's CPU kernel library) computes x @ W.T from its own blocked
   layout of W; handed a plain (out, in) matrix, it reorders W at every call, or falls back to a slower
   kernel. Packing each W once (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU
   backend does with frozen weights) makes bf16 products 1.4-3x and fp32 ones 1.5-2x faster at batch 1,
   and no slower for prefill.

`prepare_for_decode(model)` does both, in place. The result is for inference on the CPU only: the packed
weights are opaque oneDNN tensors, not parameters, so it cannot be trained, moved or saved (state_dict()
says so). `checkpoint.load_model(..., for_decode=True)` returns a model prepared so; generate.py uses it on
the CPU. Where oneDNN lacks the dtype (fp16 on most CPUs, bf16 on CPUs without it) or is absent, the fused
weights stay plain tensors and F.linear runs them.

Run `python cpu_decode.py` to prepare a random debug-sized model and compare it with the plain one.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe import Experts, FeedForward, MoE


def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run products in this dtype on this CPU from a packed weight (and this PyTorch has
    the ops: they are internal ones, those torch.compile's CPU backend emits, so an older or newer release
    may lack them; then the weights stay plain)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and hasattr(ops, "_is_mkldnn_bf16_supported") and ops._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """y = x @ W.T for inference on the CPU, W (out, in) packed once into oneDNN's layout (else kept plain)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        weight = weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        self.packed = packs(weight.dtype)
        # batch_size None: a layout for any number of rows, as fast at batch 1 as one packed for batch 1
        self.w = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if not self.packed:
            return F.linear(x, self.w)
        return torch.ops.mkldnn._linear_pointwise(x, self.w, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {'oneDNN-packed' if self.packed else 'plain'}"


def _linears(*modules) -> bool:
    return all(type(m) is nn.Linear for m in modules)  # not quantized, not LoRA, not already prepared


def _refuse_state_dict(module, prefix, keep_vars):
    raise RuntimeError("this model was prepared for decoding on the CPU (cpu_decode.prepare_for_decode): its "
                       "text weights are fused and packed for oneDNN, no longer parameters, so it cannot be "
                       "saved or trained; save or train the model as loaded, before preparing it")


@torch.no_grad()
def prepare_for_decode(model: nn.Module, done: Callable[[torch.Tensor], None] | None = None) -> nn.Module:
    """Fuse and pack the text model's weight products for CPU inference, in place; returns the model.

    Attention: wq, wk, wv -> one `wqkv`; wo packed. SwiGLUs (dense layers, the shared expert): w1, w3 ->
    one `w13`; w2 packed. Routed experts: per expert, its slices of the w1 and w3 stacks -> one (2F, D)
    product, w2 packed; the output head packed. The router stays as it is: its 16-128 rows are read faster
    plain (bench/layout.py). Quantized or LoRA modules are left alone.
    The products' terms are summed in another order than before (~1e-6 relative in fp32).
    done(w) is called with each plain weight once it is packed and dropped from the model (checkpoint.py
    releases the file pages behind it).
    """
    if model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("prepare_for_decode is for models on the CPU (on a GPU, PyTorch's kernels need no help)")
    done = done or (lambda w: None)

    def packed(*weights: torch.Tensor) -> PackedLinear:  # (out_i, in) each -> one product of all their rows
        layer = PackedLinear(torch.cat(weights) if len(weights) > 1 else weights[0])
        for w in weights:
            done(w)
        return layer

    for block in model.layers:
        a = block.attention
        if _linears(a.wq, a.wk, a.wv, a.wo):
            a.wqkv, a.wo = packed(a.wq.weight, a.wk.weight, a.wv.weight), packed(a.wo.weight)  # (H*D+2*Hkv*D, dim)
            a.wq = a.wk = a.wv = None
        ff = block.feed_forward
        for swiglu in [ff.shared_expert] if isinstance(ff, MoE) else [ff]:
            if isinstance(swiglu, FeedForward) and _linears(swiglu.w1, swiglu.w3, swiglu.w2):
                swiglu.w13, swiglu.w2 = packed(swiglu.w1.weight, swiglu.w3.weight), packed(swiglu.w2.weight)
                swiglu.w1 = swiglu.w3 = None
        if isinstance(ff, MoE) and type(ff.experts) is Experts and ff.experts.fused is None:
            ex = ff.experts  # stacks used as x @ w: w1, w3 (E, D, F), w2 (E, F, D)
            ex.fused = nn.ModuleList(nn.ModuleList([PackedLinear(torch.cat([w1.T, w3.T])), PackedLinear(w2.T)])
                                     for w1, w3, w2 in zip(ex.w1, ex.w3, ex.w2))  # (2F, D) and (D, F) each
            for w in (ex.w1, ex.w3, ex.w2):
                done(w)
            ex.w1 = ex.w3 = ex.w2 = None
    if _linears(model.output):
        model.output = packed(model.output.weight)
    if not getattr(model, "prepared_for_decode", False):
        model.register_state_dict_pre_hook(_refuse_state_dict)
        model.prepared_for_decode = True
    return model.eval()


def packed_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights prepare_for_decode made, packed or plain (they are not parameters)."""
    return [m.w for m in model.modules() if isinstance(m, PackedLinear)]


def main() -> None:
    from dataclasses import replace

    from model import FLAVORS, Transformer, init_weights

    p = argparse.ArgumentParser(description="Prepare a randomly initialized model (the debug flavor, or a wider "
                                            "one with --dim) for CPU decoding and compare it with the plain "
                                            "one: logits, greedy tokens and decode speed.")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--dim", type=int, default=None, help="model width (default: the debug flavor's 256)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timing (32), best of 3 rounds")
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    args = FLAVORS["debug"] if a.dim is None else replace(FLAVORS["debug"], dim=a.dim, moe_hidden_dim=2 * a.dim,
                                                          ffn_hidden_dim=4 * a.dim)
    models = {}
    for name in ("plain", "prepared"):
        torch.manual_seed(0)
        m = Transformer(args)
        init_weights(m)
        models[name] = m.to(dtype).eval()
    prepare_for_decode(models["prepared"])
    print(f"packed for oneDNN: {packs(dtype)} ({a.dtype}); layer 1 now holds:")
    print(f"  attention.wqkv: {models['prepared'].layers[1].attention.wqkv}")
    print(f"  one expert's w1|w3: {models['prepared'].layers[1].feed_forward.experts.fused[0][0]}")
    prompt = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    with torch.no_grad():
        for name, m in models.items():
            best = float("inf")
            for _ in range(3):
                cache = m.make_cache(1, 64 + a.steps + 1)
                logits = m(prompt, cache=cache, last_only=True)[:, -1].float()
                token, tokens = logits.argmax(-1), []
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    token = m(token[:, None], cache=cache)[:, -1].argmax(-1)
                    tokens.append(int(token))
                best = min(best, time.perf_counter() - t0)
            results[name] = logits, tokens, a.steps / best
    (ref, ref_tokens, _), (logits, tokens, _) = results["plain"], results["prepared"]
    print(f"prompt logits, max difference / max: {((logits - ref).abs().max() / ref.abs().max()).item():.1e}; "
          f"greedy tokens {'the same' if tokens == ref_tokens else 'DIFFERENT'}")
    for name, (_, _, tps) in results.items():
        print(f"  {name:>8}: decode {tps:.0f} tok/s")


if __name__ == "__main__":
    main()

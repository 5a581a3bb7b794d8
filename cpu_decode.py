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

Even so, a bf16 step reaches only a third of the bandwidth bound: oneDNN's matrix-vector kernels read weights
at 50-79% of the speed a plain `torch.sum` reads them, and a step makes ~1,300 small ATen calls besides. So
`prepare_for_decode(model, compile=True)` (generate.py --compile) goes one step further for one sequence:
3. One compiled graph per decoded token (`one_token`, `CompiledSteps`): every product is written as a
   multiply-and-sum that inductor turns into its own loop streaming the weight once, the small ops fuse, and
   the KV cache is read whole under a mask so that no shape changes from token to token. ~2x the tokens/s
   of the packed model (66-76% of the bound on the bench model), after seconds of compiling at the first token.

Run `python cpu_decode.py` to prepare a random debug-sized model and compare it with the plain one
(`--compile` for the compiled steps too).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe import Experts, FeedForward, MoE
from rope import rope_angles, rope_frequencies


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

    def __init__(self, weight: torch.Tensor, pack: bool = True):
        super().__init__()
        weight = weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        self.packed = pack and packs(weight.dtype)
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
def prepare_for_decode(model: nn.Module, done: Callable[[torch.Tensor], None] | None = None,
                       compile: bool = False) -> nn.Module:
    """Fuse and pack the text model's weight products for CPU inference, in place; returns the model.

    Attention: wq, wk, wv -> one `wqkv`; wo packed. SwiGLUs (dense layers, the shared expert): w1, w3 ->
    one `w13`; w2 packed. Routed experts: per expert, its slices of the w1 and w3 stacks -> one (2F, D)
    product, w2 packed; the output head packed. The router stays as it is: its 16-128 rows are read faster
    plain (bench/layout.py). Quantized or LoRA modules are left alone.
    The products' terms are summed in another order than before (~1e-6 relative in fp32).
    done(w) is called with each plain weight once it is packed and dropped from the model (checkpoint.py
    releases the file pages behind it).
    compile=True: fuse but do not pack, and decode one token at a time (batch 1) through one compiled graph
    per step (`CompiledSteps`, below); prompts and batches still run the model as it is.
    """
    if model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("prepare_for_decode is for models on the CPU (on a GPU, PyTorch's kernels need no help)")
    done = done or (lambda w: None)
    pack = not compile

    def packed(*weights: torch.Tensor) -> PackedLinear:  # (out_i, in) each -> one product of all their rows
        layer = PackedLinear(torch.cat(weights) if len(weights) > 1 else weights[0], pack)
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
            if pack and packs(ex.w1.dtype):  # each expert's (2F, D) and (D, F), packed one by one
                ex.fused = nn.ModuleList(nn.ModuleList([PackedLinear(torch.cat([w1.T, w3.T])), PackedLinear(w2.T)])
                                         for w1, w3, w2 in zip(ex.w1, ex.w3, ex.w2))
            else:  # plain: new stacks (E, 2F, D) and (E, D, F); each expert's products are views of them
                ex.stacks = torch.cat([ex.w1.mT, ex.w3.mT], 1).contiguous(), ex.w2.mT.contiguous()
                ex.fused = nn.ModuleList(nn.ModuleList([PackedLinear(w13, pack=False), PackedLinear(w2, pack=False)])
                                         for w13, w2 in zip(*ex.stacks))
            for w in (ex.w1, ex.w3, ex.w2):
                done(w)
            ex.w1 = ex.w3 = ex.w2 = None
    if _linears(model.output):
        model.output = packed(model.output.weight)
    if not getattr(model, "prepared_for_decode", False):
        model.register_state_dict_pre_hook(_refuse_state_dict)
        model.prepared_for_decode = True
    if compile:
        model.decode_step = CompiledSteps(model)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# One compiled graph per decoded token
# --------------------------------------------------------------------------------------------------------

def mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w (out, in) times x (in,) -> (out,) in w's dtype, summed in fp32, written as a multiply-and-sum.

    Compiled, this is one loop that streams w once, row by row: on 2 cores it reads weights ~1.5x as fast as
    oneDNN's matrix-vector kernels, close to the speed of `w.sum()` (bench/README.md). Eager, it would write
    a temporary as large as w: it is only meant for a compiled graph, and for one row."""
    return (w.float() * x.float()).sum(-1).to(w.dtype)


def swiglu(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = mv(w13, x).chunk(2)  # w1|w3 fused: [gate | up]
    return mv(w2, F.silu(gate) * up)


def one_token(model: nn.Module, token: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, ks: list, vs: list, kpos: list) -> torch.Tensor:
    """The model's forward for one token of one sequence, as a graph without data-dependent shapes: the next
    token's logits (vocab,). The same arithmetic as Transformer.forward, written in the same dtypes and order;
    in bf16, inductor keeps some fused intermediates in fp32 where the eager model rounds them to bf16, so the
    logits are not bit-equal but closer to exact (tests/test_cpu_decode.py: 0.023 against 0.137 of the largest
    logit, from the fp32 model's).

    token, pos (1,): the token and its position; slots (n_layers,): where each layer's cache stores it; cos,
    sin (1, head_dim/2): its RoPE rotation; ks, vs (1, S, Hkv, D) and kpos (1, S): each layer's KV cache, all
    S slots (empty ones at position -1), written here in place. Attention reads every slot and masks by
    position, so the shapes never change while the cache fills; the routed expert is read from the stacks
    at an index computed in the graph.
    """
    from model import attention_mask, rms_norm, temperature
    from rope import apply_rope_real

    h = model.tok_embeddings.weight[token][0]  # (dim,)
    for i, block in enumerate(model.layers):
        a, c_k, c_v, c_pos = block.attention, ks[i][0], vs[i][0], kpos[i][0]  # (S, Hkv, D), (S,)
        H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
        x = rms_norm(h, block.attention_norm.eps) * block.attention_norm.weight
        q, k, v = mv(a.wqkv.w, x).split([H * D, Hkv * D, Hkv * D])
        q, k, v = q.view(H, D), k.view(Hkv, D), v.view(Hkv, D)
        if a.use_rope:
            q, k = apply_rope_real(q.float(), cos, sin).to(q.dtype), apply_rope_real(k.float(), cos, sin).to(k.dtype)
        if a.use_qk_norm:
            q, k = rms_norm(q, a.eps), rms_norm(k, a.eps)
        if a.temperature_tuning:
            q = (q * temperature(pos, a.floor_scale, a.attn_scale)).to(q.dtype)
        slot = slots[i:i + 1]
        c_k.index_copy_(0, slot, k.to(c_k.dtype)[None])
        c_v.index_copy_(0, slot, v.to(c_v.dtype)[None])
        c_pos.index_copy_(0, slot, pos)
        visible = attention_mask(pos[None], c_pos[None], a.chunk)[0, 0, 0]  # (S,): the eager model's rule
        qg = q.float().view(Hkv, H // Hkv, D)  # GQA: query heads grouped by the KV head they share
        scores = torch.einsum("gqd,sgd->gqs", qg, c_k.float()) * D ** -0.5  # (Hkv, H/Hkv, S)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        y = torch.einsum("gqs,sgd->gqd", p, c_v.float()).reshape(H * D).to(h.dtype)
        h = h + mv(a.wo.w, y)

        ff = block.feed_forward
        x = rms_norm(h, block.ffn_norm.eps) * block.ffn_norm.weight
        if isinstance(ff, MoE):  # top-1: the shared expert plus the chosen one, on its gated input
            logits = mv(ff.router.weight, x)  # (E,)
            e = torch.argmax(logits + ff.expert_bias, dim=-1, keepdim=True)  # (1,); the bias only chooses
            gate = torch.sigmoid(logits[e].float()).to(x.dtype)
            w13, w2 = ff.experts.stacks
            out = swiglu(ff.shared_expert.w13.w, ff.shared_expert.w2.w, x) + swiglu(w13[e][0], w2[e][0], x * gate)
        else:
            out = swiglu(ff.w13.w, ff.w2.w, x)
        h = h + out
    return mv(model.output.w, rms_norm(h, model.norm.eps) * model.norm.weight)


class CompileError(RuntimeError):
    """torch.compile could not build the decode step (its CPU backend needs a working C++ compiler)."""


class CompiledSteps:
    """model(token, cache=cache) for one token of one sequence, as one compiled graph (`one_token`).

    Installed by prepare_for_decode(model, compile=True) as `model.decode_step`; Transformer.forward hands it
    every (1, 1) token with a cache. The graph is compiled at the first step (seconds), and again for a cache
    of another size. Measured on 2 cores (bench/decode.py): ~2x the tokens/s of the packed eager model at
    batch 1, because (a) the weights are read by inductor's own matrix-vector loops (`mv`), faster here than
    oneDNN's, and (b) the ~300 small ops of a layer (norms, RoPE, cache writes, attention, routing) run as a
    few fused loops, without an ATen call each. Attention reads every slot of the cache, filled or not (that
    keeps the shapes fixed): a cache much larger than the text costs time at every step.
    """

    def __init__(self, model: nn.Module):
        args = model.args
        if args.top_k != 1:
            raise ValueError(f"compiled decoding is for top-1 routing (Llama 4's); this model routes top-{args.top_k}")

        def plain(m) -> bool:  # fused by prepare_for_decode and left unpacked
            return isinstance(m, PackedLinear) and not m.packed

        for block in model.layers:
            a, ff = block.attention, block.feed_forward
            dense = ff.shared_expert if isinstance(ff, MoE) else ff
            ok = all(plain(getattr(m, w, None)) for m, w in [(a, "wqkv"), (a, "wo"), (dense, "w13"), (dense, "w2")])
            if isinstance(ff, MoE):
                ok = ok and getattr(ff.experts, "stacks", None) is not None and type(ff.router) is nn.Linear
            if not (ok and plain(model.output)):
                raise ValueError("compiled decoding needs every text weight plain and fused (quantized or LoRA "
                                 "modules are not supported): prepare_for_decode(model, compile=True)")
        self.model = model
        self.freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        self.step = torch.compile(one_token, fullgraph=True)  # a second cache size: S made dynamic
        self.compiled = False
        self.compile_s = 0.0  # wall time of the first step, which compiles (generate.py reports it apart)

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:  # (1, 1) -> logits (1, 1, vocab)
        layers = cache.layers
        slots = torch.tensor([c.next_slot() for c in layers])  # (refuses a full cache)
        pos = cache.next_pos  # (1,)
        cis = rope_angles(pos, self.freqs)  # (1, head_dim/2), complex: cos + i sin
        t0 = time.perf_counter()
        try:
            logits = self.step(self.model, tokens[0], pos, slots, cis.real, cis.imag,
                               [c.k for c in layers], [c.v for c in layers], [c.pos for c in layers])
        except Exception as e:
            if self.compiled:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CompileError(f"could not compile the decode step (torch.compile's CPU backend needs a C++ "
                               f"compiler; run without compiling instead): {type(e).__name__}: {first}") from e
        if not self.compiled:
            self.compiled, self.compile_s = True, time.perf_counter() - t0
        for c in layers:
            c.seen += 1
        cache.next_pos = pos + 1
        return logits.view(1, 1, -1)


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
    p.add_argument("--compile", action="store_true", help="also prepare a third copy with compile=True: one "
                                                         "compiled graph per token (compiled in round 1)")
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    args = FLAVORS["debug"] if a.dim is None else replace(FLAVORS["debug"], dim=a.dim, moe_hidden_dim=2 * a.dim,
                                                          ffn_hidden_dim=4 * a.dim)
    models = {}
    for name in ("plain", "prepared") + (("compiled",) if a.compile else ()):
        torch.manual_seed(0)
        m = Transformer(args)
        init_weights(m)
        models[name] = m.to(dtype).eval()
    prepare_for_decode(models["prepared"])
    if a.compile:
        prepare_for_decode(models["compiled"], compile=True)
    print(f"packed for oneDNN: {packs(dtype)} ({a.dtype}); layer 1 now holds:")
    print(f"  attention.wqkv: {models['prepared'].layers[1].attention.wqkv}")
    print(f"  one expert's w1|w3: {models['prepared'].layers[1].feed_forward.experts.fused[0][0]}")
    prompt = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    with torch.no_grad():
        for name, m in models.items():
            best, first = float("inf"), None
            for _ in range(3):
                cache = m.make_cache(1, 64 + a.steps + 1)
                logits = m(prompt, cache=cache, last_only=True)[:, -1].float()
                token, tokens = logits.argmax(-1), []
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    token = m(token[:, None], cache=cache)[:, -1].argmax(-1)
                    tokens.append(int(token))
                best, first = min(best, time.perf_counter() - t0), first or time.perf_counter() - t0
            results[name] = logits, tokens, a.steps / best, first
    ref, ref_tokens = results["plain"][:2]
    for name, (logits, tokens, _, _) in list(results.items())[1:]:
        print(f"{name}: prompt logits, max difference / max: "
              f"{((logits - ref).abs().max() / ref.abs().max()).item():.1e}; "
              f"greedy tokens the same as plain's: {sum(a == b for a, b in zip(tokens, ref_tokens))}/{len(tokens)}"
              + ("" if tokens == ref_tokens or dtype == torch.float32 else " (bf16: each path rounds differently)"))
    for name, (_, _, tps, first) in results.items():
        print(f"  {name:>8}: decode {tps:.0f} tok/s" + (f" (round 1, compiling: {first:.1f} s)" if name == "compiled" else ""))


if __name__ == "__main__":
    main()

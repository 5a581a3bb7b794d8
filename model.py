"""The Llama 4 text transformer (Scout 17Bx16E, Maverick 17Bx128E, and a tiny debug flavor).

A decoder-only transformer in the Llama tradition (pre-norm RMSNorm blocks, SwiGLU feed-forwards, GQA
attention, untied embeddings), with the pieces that make Llama 4 what it is:

1. iRoPE. Three of every four layers use RoPE and attend only inside fixed chunks of 8192 tokens
   (chunks aligned to absolute position 0); every fourth layer (3, 7, 11, ...) has no positional encoding
   at all (NoPE) and attends to everything before it. On NoPE layers the queries are sharpened at long range
   ("attention temperature tuning"): q *= log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1.
2. QK-norm (Scout): on RoPE layers, queries and keys are RMS-normalized per head, without a weight,
   after the rotation.
3. Mixture of experts (moe.py): Scout's every layer, Maverick's every other layer, holds 16 / 128 routed
   experts plus a shared expert, top-1 routed; the other layers are dense SwiGLUs of width 16384.
4. Early fusion: image features from vision.py replace the embeddings of `<|patch|>` tokens, so the same
   transformer reads text and images.

The KV cache honours the chunking during decoding (Meta's reference does not): a RoPE layer keeps at most one
chunk of keys, a NoPE layer keeps them all.

Run `python model.py --flavor scout` to build Scout on the meta device and count its parameters.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe import FeedForward, MoE
from rope import apply_rope, nope_layers, rope_angles, rope_frequencies

# Decoding on CUDA keeps PyTorch away from cuDNN's attention kernel: cuDNN builds an execution plan for every
# new shape, and a decode step's key length is new every step. Measured on an H200 (torch 2.11, bench/
# gpu_profile.py): 30-70 ms of CPU per call, 90% of a step, against ~1 ms for the step's GPU work.
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class ModelArgs:
    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 202048
    norm_eps: float = 1e-5
    # feed-forwards: routed experts and the shared expert are moe_hidden_dim wide, dense layers ffn_hidden_dim
    n_experts: int = 16
    top_k: int = 1
    moe_hidden_dim: int = 8192
    ffn_hidden_dim: int = 16384
    interleave_moe_layer_step: int = 1      # MoE on layers step-1, 2*step-1, ... (Maverick: 2 -> odd layers)
    moe_layers: list[int] | None = None      # explicit list; derived from the step when None
    # attention
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None         # llama3 scaling: factor, low/high_freq_factor, original_context
    nope_layer_interval: int = 4             # every 4th layer has no RoPE: 3, 7, 11, ...
    nope_layers: list[int] | None = None     # explicit list; derived from the interval when None
    attention_chunk_size: int | None = 8192  # RoPE layers attend within chunks of this many tokens
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    max_seq_len: int = 10485760              # longest context the checkpoint claims (informational)
    image_token_id: int = 200092             # <|patch|>: image features replace these embeddings
    vision: object | None = None             # vision.VisionArgs for multimodal checkpoints

    def __post_init__(self):
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.n_layers, step)) if self.n_experts else []
        if self.nope_layers is None:
            self.nope_layers = nope_layers(self.n_layers, self.nope_layer_interval)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


SCOUT_ROPE_SCALING = dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_context=8192)

FLAVORS: dict[str, ModelArgs] = {
    # A model that trains in minutes on 2 CPU cores, with every Llama 4 feature switched on: both layer kinds
    # (layer 3 is NoPE), dense and MoE layers, QK-norm, chunked attention, scaled RoPE. Its vocabulary is the
    # first 8192 BPE ranks of the real one plus the 2048 special tokens (see tokenizer.py).
    "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=10240,
                       n_experts=8, moe_hidden_dim=512, ffn_hidden_dim=1024, interleave_moe_layer_step=2,
                       rope_scaling=SCOUT_ROPE_SCALING, attention_chunk_size=128, floor_scale=64.0,
                       max_seq_len=4096, image_token_id=8192 + 92),
    "scout": ModelArgs(n_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                       rope_scaling=SCOUT_ROPE_SCALING),
    "maverick": ModelArgs(n_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                          max_seq_len=1048576),
}


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps), computed in fp32 and cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps) * self.weight  # normalize in fp32, cast back, then scale


# --------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------

class KVCache:
    """One layer's keys and values, with the absolute position of each slot (-1 = empty or padding).

    A NoPE layer gets `size` = the whole context. A RoPE layer only ever looks inside its current chunk,
    so it gets `size` = chunk size and is used as a ring: slot = (tokens seen so far) % size. Attention
    reads the slots in any order; the stored positions decide what each query may see.
    """

    def __init__(self, batch: int, size: int, n_kv_heads: int, head_dim: int, ring: bool,
                 dtype: torch.dtype, device: torch.device | str):
        self.k = torch.zeros(batch, size, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.size, self.ring, self.seen = size, ring, 0

    def next_slot(self, T: int = 1) -> int:
        """The slot where the next T tokens start; refuses them if a (non-ring) cache has no room."""
        if not self.ring and self.seen + T > self.size:
            raise ValueError(f"KV cache is full: {self.seen} + {T} tokens > {self.size} slots "
                             "(make the cache with a larger max_len)")
        return self.seen % self.size

    def _write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        T = k.shape[1]
        if T > self.size:  # only the newest `size` slots survive in a ring
            self.seen += T - self.size
            k, v, pos, T = k[:, -self.size:], v[:, -self.size:], pos[:, -self.size:], self.size
        start = self.next_slot(T)
        if start + T <= self.size:  # contiguous slots (every decode step): a slice, half the cost of indexing
            slots = slice(start, start + T)
        else:  # wrapping around the ring
            slots = (start + torch.arange(T, device=k.device)) % self.size
        self.k[:, slots], self.v[:, slots], self.pos[:, slots] = k, v, pos  # (cast to the cache's dtype)
        self.seen += T

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Add the new keys/values (B, T, Hkv, D) at positions pos (B, T); return what attention reads."""
        filled = min(self.seen, self.size)
        if self.ring and k.shape[1] > 1:
            # Several new tokens in a ring: writing first could overwrite keys the earliest new queries still
            # need, so attend over old + new, then keep the newest.
            keys = torch.cat([self.k[:, :filled], k], 1)
            vals = torch.cat([self.v[:, :filled], v], 1)
            kpos = torch.cat([self.pos[:, :filled], pos], 1)
            self._write(k, v, pos)
            return keys, vals, kpos
        self._write(k, v, pos)
        n = min(self.seen, self.size)
        return self.k[:, :n], self.v[:, :n], self.pos[:, :n]


def cache_dtype(weight: torch.Tensor) -> torch.dtype:
    """The KV cache's dtype for a model with this weight: its own, but fp32 on the CPU, where attention runs in
    fp32 (Attention): there a bf16 cache, converted whole at every decode step, cost ~10% of the step."""
    low = weight.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if weight.device.type == "cpu" and low else weight.dtype


class Cache:
    """The whole model's decoding state: one KVCache per layer and each row's next position."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device="cpu"):
        self.layers = []
        for i in range(args.n_layers):
            chunked = i not in args.nope_layers and args.attention_chunk_size is not None
            size = min(args.attention_chunk_size, max_len) if chunked else max_len
            self.layers.append(KVCache(batch, size, args.n_kv_heads, args.head_dim, chunked, dtype, device))
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes + c.pos.nbytes for c in self.layers)

    def is_empty(self) -> bool:
        return all(c.seen == 0 for c in self.layers)


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------

def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Which keys each query may see, from absolute positions q_pos (B, T) and k_pos (B, S) -> (B, 1, T, S).

    Causal: k <= q, and k is not padding (-1). Chunked (RoPE layers): also the same chunk, k // C == q // C,
    with chunks aligned to position 0 -- per row, so left-padded batches are chunked like single prompts.
    Padding queries (q = -1) may see everything: their outputs are discarded, and an all-masked row would
    turn into NaN.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    if chunk is not None:
        visible &= torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor")
    return (visible | (q < 0))[:, None]


def causal_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunked causal attention for one unpadded sequence per row from position 0 (training, prefill), heads
    first: q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D).

    The chunks are independent causal triangles, so they are stacked as a batch (B * T/chunk, H, chunk, D) and
    SDPA computes only those triangles, instead of all T x T scores under a mask: for T = 2 chunks, a quarter
    of the scores. A last partial chunk is a causal triangle of its own.
    """
    B, H, T, D = q.shape
    n = T // chunk  # whole chunks

    def stacked(x: torch.Tensor) -> torch.Tensor:  # (B, h, n * chunk, D) -> (B * n, h, chunk, D)
        return x[:, :, :n * chunk].unflatten(2, (n, chunk)).transpose(1, 2).flatten(0, 1)

    y = F.scaled_dot_product_attention(stacked(q), stacked(k), stacked(v), is_causal=True, enable_gqa=True)
    y = y.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)  # (B, H, n * chunk, D)
    if n * chunk < T:
        s = n * chunk
        tail = F.scaled_dot_product_attention(q[:, :, s:], k[:, :, s:], v[:, :, s:], is_causal=True, enable_gqa=True)
        y = torch.cat([y, tail], dim=2)
    return y


def temperature(pos: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Query scale for NoPE layers: 1 up to position floor_scale - 2, then growing like log(pos)."""
    return torch.log(torch.floor((pos.float() + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.use_rope = layer_id not in args.nope_layers
        self.use_qk_norm = args.use_qk_norm and self.use_rope
        self.chunk = args.attention_chunk_size if self.use_rope else None  # NoPE layers attend globally
        self.temperature_tuning = args.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale, self.eps = args.floor_scale, args.attn_scale, args.norm_eps
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv as one product (cpu_decode.prepare_for_decode)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cis: torch.Tensor, cache: KVCache | None,
                plain_causal: bool, masks: dict) -> torch.Tensor:
        """masks: shared by all layers of one forward, one mask per chunk size (None = NoPE), built by the first
        layer that needs it -- every layer of a kind holds keys at the same positions, so the masks agree."""
        B, T, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)     # (B, T, H, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        if self.use_rope:
            q, k = apply_rope(q, cis), apply_rope(k, cis)
        if self.use_qk_norm:  # weightless RMSNorm per head, after the rotation
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)
        if self.temperature_tuning:
            scale = temperature(pos, self.floor_scale, self.attn_scale)[:, :, None, None]  # (B, T, 1, 1)
            q = (q * scale).to(q.dtype)
        k_pos = pos
        if cache is not None:
            k, v, k_pos = cache.update(k, v, pos)  # (B, S, Hkv, D), (B, S)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        if x.device.type == "cpu":  # PyTorch's CPU attention is slow in bf16 for one-token queries: use fp32
            q, k, v = q.float(), k.float(), v.float()
        if plain_causal and (self.chunk is None or T <= self.chunk):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif plain_causal:  # several whole chunks, each its own causal triangle
            y = causal_in_chunks(q, k, v, self.chunk)
        else:
            if self.chunk not in masks:
                masks[self.chunk] = attention_mask(pos, k_pos, self.chunk)  # (B, 1, T, S)
            with sdpa_kernel(NO_CUDNN) if x.is_cuda and T == 1 else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[self.chunk], enable_gqa=True)
        return self.wo(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


# --------------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if layer_id in args.moe_layers:
            self.feed_forward = MoE(args.dim, args.moe_hidden_dim, args.n_experts, args.top_k)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x, pos, cis, cache, plain_causal, masks):
        h = x + self.attention(self.attention_norm(x), pos, cis, cache, plain_causal, masks)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # nn.Embedding's own init, N(0, 1), except on the meta device (checkpoint loading): there is nothing to
        # draw there, and normal_ on a meta tensor would import torch._dynamo (~1.5 s, once per process).
        embedding = torch.empty(args.vocab_size, args.dim)
        if not embedding.is_meta:
            nn.init.normal_(embedding)
        self.tok_embeddings = nn.Embedding.from_pretrained(embedding, freeze=False)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from tok_embeddings
        self.decode_step = None  # a compiled one-token step (cpu_decode.prepare_for_decode(..., compile=True))
        self.vision = None
        if args.vision is not None:
            from vision import VisionModel
            self.vision = VisionModel(args.vision)

    def make_cache(self, batch: int, max_len: int) -> Cache:
        p = self.tok_embeddings.weight  # (the output head may be packed for the CPU: cpu_decode.py)
        return Cache(self.args, batch, max_len, cache_dtype(p), p.device)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image tiles (N, 3, 336, 336) -> features (N * 144, dim), in the order their <|patch|> tokens come."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder (load the checkpoint with vision=True)")
        return self.vision(pixels).flatten(0, 1)

    def embed(self, tokens: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, with image features (n, dim) in place of the n `<|patch|>` tokens, in order."""
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if image_features is not None:
            slots = tokens == self.args.image_token_id
            if int(slots.sum()) != image_features.shape[0]:
                raise ValueError(f"{int(slots.sum())} <|patch|> tokens but {image_features.shape[0]} image features")
            h = h.masked_scatter(slots[..., None], image_features.to(h.dtype))
        return h

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None, positions: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with last_only.

        positions (B, T): absolute position of each token, -1 for (left) padding. By default 0..T-1, or,
        with a cache, continuing where the cache left off.
        """
        B, T = tokens.shape
        if self.decode_step is not None and (B, T) == (1, 1) and cache is not None and positions is None \
                and image_features is None and not torch.is_grad_enabled():
            return self.decode_step(tokens, cache)  # (1, 1, vocab), the same logits from one compiled graph
        default_positions = positions is None
        if positions is None:
            start = cache.next_pos[:, None] if cache is not None else 0
            positions = start + torch.arange(T, device=tokens.device)[None]  # (B, T)
        positions = positions.expand(B, T)
        # Attention is a plain causal triangle (SDPA's is_causal: no mask to build, the masked half skipped)
        # when every row is one unpadded sequence from position 0 with nothing cached before it: training,
        # scoring, and the prefill of unpadded prompts.
        plain_causal = (cache is None and default_positions) or (
            (cache is None or cache.is_empty()) and bool((positions == torch.arange(T, device=positions.device)).all()))
        freqs = rope_frequencies(self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        cis = rope_angles(positions, freqs)  # (B, T, head_dim/2), complex
        h = self.embed(tokens, image_features)
        masks = {}  # attention masks, built once per forward for each kind of layer (see Attention)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, cis, cache.layers[i] if cache is not None else None, plain_causal, masks)
        if cache is not None:
            cache.next_pos = positions[:, -1] + 1
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))


# --------------------------------------------------------------------------------------------------------
# Initialization and parameter counts
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: Transformer, std: float = 0.02) -> None:
    """Fresh weights for training from scratch: N(0, std), output projections shrunk by depth (GPT-2 style)."""
    out_std = std / math.sqrt(2 * model.args.n_layers)
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            continue
        if p.ndim == 1:  # the text model's only vectors are RMSNorm weights
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
            nn.init.normal_(p, std=out_std)
        elif p.ndim >= 2:
            nn.init.normal_(p, std=std)
    if model.vision is not None and hasattr(model.vision, "init_weights"):
        model.vision.init_weights()


def param_counts(model: Transformer) -> dict[str, int]:
    """Total and active parameters, text and vision apart, counted from the modules.

    Active = what one text token touches: everything in the text model except the routed experts it was not
    sent to (top_k of n_experts per MoE layer). Embeddings and the output head count.
    """
    vision = sum(p.numel() for p in model.vision.parameters()) if model.vision is not None else 0
    text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision."))
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.n_experts
            inactive += per_expert * (m.n_experts - m.top_k)
    return dict(total=text + vision, text=text, vision=vision, active=text - inactive)


def main() -> None:
    p = argparse.ArgumentParser(description="Build a Llama 4 flavor on the meta device (no memory) and count "
                                            "its parameters; with --forward, run the debug flavor on random tokens.")
    p.add_argument("--flavor", default="scout", choices=sorted(FLAVORS), help="which configuration")
    p.add_argument("--text-only", action="store_true", help="leave out the vision encoder")
    p.add_argument("--forward", action="store_true", help="also run a forward pass (small flavors only)")
    a = p.parse_args()
    args = FLAVORS[a.flavor]
    if not a.text_only:
        from vision import VisionArgs
        args = replace(args, vision=VisionArgs.debug(args.dim) if a.flavor == "debug" else VisionArgs(text_dim=args.dim))
    with torch.device("meta"):
        model = Transformer(args)
    c = param_counts(model)
    kinds = "".join("N" if i in args.nope_layers else "R" for i in range(args.n_layers))
    ffns = "".join("M" if i in args.moe_layers else "D" for i in range(args.n_layers))
    print(f"Llama 4 {a.flavor}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / "
          f"{args.n_kv_heads} kv heads, {args.n_experts} experts top-{args.top_k}, vocab {args.vocab_size}")
    print(f"  attention per layer (R = RoPE + chunk {args.attention_chunk_size}, N = NoPE global): {kinds}")
    print(f"  feed-forward per layer (M = MoE, D = dense {args.ffn_hidden_dim}): {ffns}")
    print(f"  total parameters  {c['total'] / 1e9:9.3f} B   (text {c['text'] / 1e9:.3f} B + vision {c['vision'] / 1e9:.3f} B)")
    print(f"  active per token  {c['active'] / 1e9:9.3f} B   (text, one routed expert per MoE layer)")
    print(f"  bf16 weights      {2 * c['total'] / 1e9:9.1f} GB")
    if a.forward:
        model = Transformer(replace(args, vision=None))
        init_weights(model)
        tokens = torch.randint(0, args.vocab_size, (2, 16))
        print(f"  forward: tokens {tuple(tokens.shape)} -> logits {tuple(model(tokens).shape)}")


if __name__ == "__main__":
    main()

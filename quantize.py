"""Weight-only quantization of Llama 4: int4 (group-wise) and FP8 (row-wise) expert weights.

Scout is 217 GB in bf16 and almost all of it is routed experts (96.6B of its 108.6B parameters), so storing
just the experts in 4 bits is what lets Scout "fit on a single H100". What makes this work for Llama 4:

1. The routed experts are 89% of Scout's weights (96% of Maverick's) and the attention, router, norms and
   embeddings are small: quantizing the experts alone shrinks the model ~2.9x. Scout int4: routed experts
   only ~74 GB; routed + shared experts (Meta's `int4_mixed`) ~65 GB. Maverick FP8 experts: 803 -> ~417 GB.
2. Meta's reference has two recipes (fbgemm kernels, CUDA only): `int4_mixed`, symmetric int4 with one
   scale per group of 128 weights along the reduction dimension, and `fp8_mixed`, e4m3 with one scale per
   output row. Both formats are implemented here in plain PyTorch.
3. Weight-only: activations stay in the model dtype. A quantized matmul dequantizes the weight tile by tile
   (one block of rows of one expert at a time), so no bf16 copy of a layer ever exists. On CUDA it uses
   PyTorch's fused kernels instead: `torch._weight_int4pack_mm` (int4) and `torch._scaled_mm` (FP8).

The formats (every weight is seen as [out, in] = (N, K), K being the dimension the matmul sums over):

- int4: groups of G = 128 consecutive weights along K (or the largest power of two <= G dividing K; a
  warning says so). scale = amax(|group|) / 7, q = round(w / scale) in [-7, 7], w ~ q * scale.
  Error bound: |w - q * scale| <= scale / 2 = amax / 14 for every weight (no value is ever clipped).
  Meta uses scale = amax / 8 with q clamped to [-8, 7]: finer steps, but the group's largest positive
  weight is clipped from 8 to 7 steps, a worst-case error of a whole step (amax / 8). We keep the bound.
  Two q per byte as 4-bit two's complement, even index in the low nibble (Meta's packing); bf16 scales.
  Bytes per weight: 1/2 + 2/G (0.516 for G = 128, 0.258x of bf16).
- FP8: e4m3 (torch.float8_e4m3fn, max 448) with one fp32 scale per output row: scale = amax(|row|) / 448.
  Error bound: 3 mantissa bits, so |w - deq| <= 2^-4 |w| for normal numbers and <= 2^-10 * scale in the
  subnormal range (|w| < 2^-6 * scale).

Expert weights are stored (E, D, F) / (E, F, D) and used as `x @ w`; quantized they are stored transposed,
(E, F, D) / (E, D, F), so that every row is one output and K is the last dimension. Names in a quantized
checkpoint: `<module>.qweight` and `<module>.scale`, e.g. `layers.0.feed_forward.experts.w1.qweight`.

    python quantize.py --ckpt DIR --mode int4 --out DIR_INT4     # write a quantized checkpoint
    python quantize.py --ckpt DIR --report --mode fp8            # per-tensor error and bytes, no writing
    python generate.py --ckpt DIR --quantize int4 ...            # or quantize on the fly while loading
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import checkpoint
from moe import MoE
from storage import CheckpointError, SafetensorsFile, staged, write_safetensors
from tokenizer import Tokenizer

MODES = ("int4", "fp8")
TARGETS = ("experts", "shared", "dense", "attention")  # never the router, norms, embeddings or output
GROUP_SIZE = 128
INT4_LEVELS = 7      # scale = amax / 7: q in [-7, 7]
FP8_MAX = 448.0      # largest finite float8_e4m3fn
TILE_ELEMENTS = 1 << 22  # the readable path dequantizes at most this many weights at a time (16 MB in fp32)
INNER_K_TILES = 8    # tinygemm layout parameter for torch._weight_int4pack_mm


# --------------------------------------------------------------------------------------------------------
# The formats: tensors in, tensors out
# --------------------------------------------------------------------------------------------------------

def int4_group_size(k: int, group_size: int = GROUP_SIZE) -> int:
    """The largest power of two <= group_size that divides k (the reduction dimension)."""
    if k % 2:
        raise ValueError(f"int4 packs two weights per byte along the reduction dimension, which is odd ({k})")
    g = 1 << (group_size.bit_length() - 1)
    while k % g:
        g //= 2
    return g


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] (..., K) -> bytes (..., K/2): q[2i] in the low nibble, q[2i+1] in the high one."""
    nibbles = (q & 0xF).to(torch.uint8)  # 4-bit two's complement: -1 -> 0b1111
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes (..., K/2) -> int8 values in [-8, 7] (..., K)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.int8)  # (..., K) in 0..15
    return (nibbles ^ 8) - 8  # sign-extend 4 bits: 0..7 stay, 8..15 -> -8..-1


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) -> packed q (..., N, K/2) uint8 and scales (..., N, K/G) bf16, groups along K."""
    K = w.shape[-1]
    G = int4_group_size(K, group_size)
    groups = w.float().unflatten(-1, (K // G, G))  # (..., N, K/G, G)
    amax = groups.abs().amax(-1, keepdim=True)  # (..., N, K/G, 1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)} holding inf or NaN")
    # Round the scale to bf16 *before* dividing by it, so that q * scale is exactly what dequantizes.
    # Zero groups get the smallest normal scale instead of 0 (q = 0, no 0/0).
    scale = (amax / INT4_LEVELS).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    q = torch.round(groups / scale.float()).clamp(-8, 7).to(torch.int8).flatten(-2)  # (..., N, K)
    return pack_int4(q), scale.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed (..., N, K/2) and scales (..., N, K/G) -> weights (..., N, K); the group size is K / (K/G)."""
    q = unpack_int4(packed).float()  # (..., N, K)
    G = q.shape[-1] // scale.shape[-1]
    return (q.unflatten(-1, (-1, G)) * scale.float()[..., None]).flatten(-2).to(dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) -> float8_e4m3fn (..., N, K) and one fp32 scale per row (..., N)."""
    wf = w.float()
    amax = wf.abs().amax(-1, keepdim=True)  # (..., N, 1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)} holding inf or NaN")
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # round to nearest, never overflow
    return q, scale.squeeze(-1)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def quantize(w: torch.Tensor, mode: str, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int4(w, group_size) if mode == "int4" else quantize_fp8(w)


def dequantize(q: torch.Tensor, scale: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_int4(q, scale, dtype) if mode == "int4" else dequantize_fp8(q, scale, dtype)


# --------------------------------------------------------------------------------------------------------
# Modules: a quantized linear layer (optionally a stack of E of them) and the quantized experts
# --------------------------------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """y = x @ W.T for a weight W [out, in], or W[e] of a stack [E, out, in], stored quantized.

    Buffers: `qweight` (int4: uint8 [.., out, in/2]; fp8: float8_e4m3fn [.., out, in]) and `scale`
    (int4: bf16 [.., out, in/G]; fp8: fp32 [.., out]). Built empty on the meta device, then `set_weight`
    quantizes a full-precision weight into them (or a checkpoint's packed tensors are assigned directly).
    """

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = GROUP_SIZE,
                 stack: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; choose from {MODES}")
        self.in_features, self.out_features, self.mode, self.stack = in_features, out_features, mode, stack
        # int4: groups along the input dimension; fp8: one scale per row
        self.group_size = int4_group_size(in_features, group_size) if mode == "int4" else in_features
        (q_shape, q_dtype), (s_shape, s_dtype) = self._buffer_specs()
        self.register_buffer("qweight", torch.empty(q_shape, dtype=q_dtype))
        self.register_buffer("scale", torch.empty(s_shape, dtype=s_dtype))
        self.layout = "plain"  # "tinygemm" once int4 weights are repacked for the CUDA kernel (in place)
        # No-grad CUDA forwards use the fused kernels. lora.add_lora turns them off for the whole model (QLoRA):
        # the backward dequantizes W, which int4's kernel layout does not allow, and the FP8 kernel also rounds
        # the activations, so evaluation would compute another function than training.
        self.fused = True

    def _buffer_specs(self):
        lead = (self.stack,) if self.stack is not None else ()
        N, K = self.out_features, self.in_features
        if self.mode == "int4":
            return ((*lead, N, K // 2), torch.uint8), ((*lead, N, K // self.group_size), torch.bfloat16)
        return ((*lead, N, K), torch.float8_e4m3fn), ((*lead, N), torch.float32)

    def extra_repr(self) -> str:
        stack = f", stack={self.stack}" if self.stack is not None else ""
        scales = f"group={self.group_size}" if self.mode == "int4" else "row scales"
        return f"in={self.in_features}, out={self.out_features}, {self.mode}, {scales}{stack}"

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize w [.., out, in] (any float dtype, any device) into the buffers, one matrix at a time so
        that the fp32 temporaries stay the size of one expert."""
        (q_shape, q_dtype), (s_shape, s_dtype) = self._buffer_specs()
        if tuple(w.shape) != q_shape[:-1] + (self.in_features,):
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit {self.extra_repr()}")
        if not w.is_floating_point():
            raise ValueError(f"can only quantize floating-point weights, got {w.dtype}")
        self.qweight = torch.empty(q_shape, dtype=q_dtype, device=w.device)
        self.scale = torch.empty(s_shape, dtype=s_dtype, device=w.device)
        mats = [(self.qweight[e], self.scale[e], w[e]) for e in range(self.stack)] if self.stack is not None \
            else [(self.qweight, self.scale, w)]
        for q_out, s_out, m in mats:
            q, s = quantize(m, self.mode, self.group_size)
            q_out.copy_(q)
            s_out.copy_(s)
        self.layout = "plain"

    def dequantize(self, e: int | None = None, rows: slice = slice(None), dtype=torch.float32) -> torch.Tensor:
        """The weight (or expert e's weight), rows `rows`, back in full precision: [rows, in]."""
        if self.layout != "plain":
            raise RuntimeError("int4 weights were repacked for the CUDA kernel; reload to read them back")
        q = self.qweight if e is None else self.qweight[e]
        s = self.scale if e is None else self.scale[e]
        return dequantize(q[rows], s[rows], self.mode, dtype)

    def forward(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out); with a stack, e picks the matrix. Differentiable in x (QLoRA trains
        adapters through frozen quantized layers), never in the weights."""
        if torch.is_grad_enabled() and x.requires_grad:
            if self.layout != "plain":
                raise RuntimeError("int4 weights were repacked for the CUDA kernel by an earlier forward; "
                                   "gradients cannot flow through them (lora.add_lora before any forward avoids this)")
            return FrozenMatmul.apply(x, self, e)
        if x.is_cuda and self.fused and self._cuda_kernel_ok(x.device):
            return self._forward_cuda(x, e)
        return self._forward_tiles(x, e)

    def _forward_tiles(self, x: torch.Tensor, e: int | None) -> torch.Tensor:
        if self.layout != "plain":
            raise RuntimeError(f"int4 weights in the CUDA layout, but the input is on {x.device}")
        # Readable path: dequantize a block of output rows, multiply, move on. Only one tile is alive.
        rows = max(1, TILE_ELEMENTS // self.in_features)
        outs = [x @ self.dequantize(e, slice(r, r + rows), x.dtype).t()  # (..., rows)
                for r in range(0, self.out_features, rows)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    # -- CUDA: PyTorch's fused kernels ------------------------------------------------------------------

    def _cuda_kernel_ok(self, device: torch.device) -> bool:
        cc = torch.cuda.get_device_capability(device)
        K, N = self.in_features, self.out_features
        if self.mode == "fp8":  # cuBLASLt FP8 GEMM: Ada / Hopper and later, dims multiples of 16
            return hasattr(torch, "_scaled_mm") and cc >= (8, 9) and K % 16 == 0 and N % 16 == 0
        return (hasattr(torch, "_weight_int4pack_mm") and cc >= (8, 0) and self.group_size in (32, 64, 128, 256)
                and K % (INNER_K_TILES * 16) == 0 and N % 8 == 0)

    def _forward_cuda(self, x: torch.Tensor, e: int | None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if self.mode == "fp8":
            q = self.qweight if e is None else self.qweight[e]
            s = self.scale if e is None else self.scale[e]
            y = fp8_scaled_mm(x2, q, s)
        else:
            if self.layout == "plain":
                self._to_tinygemm()
            q = self.qweight if e is None else self.qweight[e]
            sz = self._scales_and_zeros if e is None else self._scales_and_zeros[e]
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), q, self.group_size, sz)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def _to_tinygemm(self) -> None:
        """Repack int4 weights, in place, into the tile layout of torch._weight_int4pack_mm (done once, on the
        first CUDA forward). Its input convention: unsigned q + 8, even index in the HIGH nibble; its
        scales_and_zeros (K/G, N, 2) dequantize as (u - 8) * scale + zero, so zero = 0 here."""
        mats = tinygemm_bytes(self.qweight).view(-1, self.out_features, self.in_features // 2)
        packed = torch.stack([torch._convert_weight_to_int4pack(m.contiguous(), INNER_K_TILES) for m in mats])
        self.qweight = packed.view(*self.qweight.shape[:-2], *packed.shape[1:]) if self.stack is not None \
            else packed[0]
        self._scales_and_zeros = tinygemm_scales_and_zeros(self.scale)
        self.layout = "tinygemm"


class FrozenMatmul(torch.autograd.Function):
    """y = x @ W.T through a frozen QuantizedLinear, with the gradient w.r.t. x only: grad_x = grad_y @ W.

    Both directions dequantize W tile by tile, on every device (the fused CUDA kernels have no backward).
    Nothing dequantized is saved for the backward: autograd would keep every layer's full-precision W alive
    until then, the full-precision model that QLoRA exists to avoid."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear, e: int | None) -> torch.Tensor:
        ctx.layer, ctx.e, ctx.x_dtype = layer, e, x.dtype
        return layer._forward_tiles(x, e)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # grad_y (..., out) -> grad_x (..., in)
        layer, e = ctx.layer, ctx.e
        rows = max(1, TILE_ELEMENTS // layer.in_features)
        grad_x = 0
        for r in range(0, layer.out_features, rows):
            grad_x = grad_x + grad_y[..., r:r + rows] @ layer.dequantize(e, slice(r, r + rows), grad_y.dtype)
        return grad_x.to(ctx.x_dtype), None, None


def tinygemm_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Our bytes (q[2i] low nibble, two's complement) -> the input of torch._convert_weight_to_int4pack
    (q[2i] + 8 in the high nibble, q[2i+1] + 8 in the low one). Flipping a nibble's top bit adds 8 mod 16."""
    return (((packed & 0x0F) << 4) | (packed >> 4)) ^ 0x88


def tinygemm_scales_and_zeros(scale: torch.Tensor) -> torch.Tensor:
    """Our int4 scales (..., N, K/G) -> the (..., K/G, N, 2) [scale, zero] pairs of torch._weight_int4pack_mm."""
    s = scale.to(torch.bfloat16).transpose(-1, -2)  # (..., K/G, N)
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def fp8_scaled_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q * scale).T via torch._scaled_mm: activations quantized to FP8 per row on the fly
    (scale = amax / 448), both scales applied in the epilogue; bf16 out. q (N, K) row-major is exactly
    the column-major (K, N) operand the kernel wants."""
    xs = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # (M, 1)
    xq = (x.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.float()[None], out_dtype=torch.bfloat16)


class QuantizedExperts(nn.Module):
    """Stand-in for moe.Experts: w1, w3 and w2 of all E experts, quantized, with the same `expert(e, x)`."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, mode: str, group_size: int = GROUP_SIZE):
        super().__init__()
        self.w1 = QuantizedLinear(dim, hidden_dim, mode, group_size, stack=n_experts)  # gate
        self.w3 = QuantizedLinear(dim, hidden_dim, mode, group_size, stack=n_experts)  # up
        self.w2 = QuantizedLinear(hidden_dim, dim, mode, group_size, stack=n_experts)  # down

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x (n, D) -> (n, D)."""
        return self.w2(F.silu(self.w1(x, e)) * self.w3(x, e), e)


# --------------------------------------------------------------------------------------------------------
# Whole models: which modules, swapping them, quantizing on the fly while loading
# --------------------------------------------------------------------------------------------------------

def _plan(model: nn.Module, targets) -> list[tuple[str, str]]:
    """(module path, kind) of every module whose weights get quantized; kind "experts" or "linear"."""
    plan = []
    for i, layer in enumerate(model.layers):
        pre, ff = f"layers.{i}.", layer.feed_forward
        if isinstance(ff, MoE):
            if "experts" in targets:
                plan.append((pre + "feed_forward.experts", "experts"))
            if "shared" in targets:
                plan += [(pre + f"feed_forward.shared_expert.{w}", "linear") for w in ("w1", "w3", "w2")]
        elif "dense" in targets:
            plan += [(pre + f"feed_forward.{w}", "linear") for w in ("w1", "w3", "w2")]
        if "attention" in targets:
            plan += [(pre + f"attention.{w}", "linear") for w in ("wq", "wk", "wv", "wo")]
    return plan


def check_options(mode: str, targets) -> tuple[str, ...]:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown quantization target(s) {bad}; choose from {', '.join(TARGETS)}")
    return targets


def _weights_of(path: str, kind: str) -> dict[str, tuple[str, bool]]:
    """Original weight names of a planned module -> (the QuantizedLinear inside its replacement that holds
    the weight, "" = the replacement itself; whether the weight arrives transposed: experts are (E, in, out))."""
    if kind == "experts":
        return {f"{path}.{w}": (w, True) for w in ("w1", "w3", "w2")}
    return {f"{path}.weight": ("", False)}


def _replace(model: nn.Module, path: str, kind: str, mode: str, group_size: int) -> nn.Module:
    """Swap the module at `path` for an empty quantized one (buffers on the meta device) and return it."""
    old = model.get_submodule(path)
    with torch.device("meta"):
        if kind == "experts":
            new = QuantizedExperts(*old.w1.shape, mode, group_size)  # w1: (E, D, F)
        else:
            new = QuantizedLinear(old.in_features, old.out_features, mode, group_size)
    for q in [m for m in new.modules() if isinstance(m, QuantizedLinear)]:
        if mode == "int4" and q.group_size != group_size:
            warnings.warn(f"int4: {path}: input dimension {q.in_features} is not a multiple of {group_size}; "
                          f"using groups of {q.group_size}")
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return new


def _is_quantized(m: nn.Module) -> bool:
    return isinstance(m, (QuantizedLinear, QuantizedExperts))


def _record(model: nn.Module, mode: str, group_size: int, targets) -> None:
    """Check against, and extend, the settings kept in `model.quantization` (one mode per model)."""
    done = getattr(model, "quantization", None)
    if done is not None and (done["mode"] != mode or (mode == "int4" and done["group_size"] != group_size)):
        raise ValueError(f"the model is already quantized to {done['mode']} (group {done['group_size']})")
    before = done["targets"] if done is not None else []
    model.quantization = dict(mode=mode, group_size=group_size,
                              targets=[t for t in TARGETS if t in before or t in targets])


def swap_in_quantized(model: nn.Module, mode: str, group_size: int = GROUP_SIZE, targets=("experts",)) -> None:
    """Replace the target modules by empty quantized ones, to be filled from a quantized checkpoint."""
    targets = check_options(mode, targets)
    _record(model, mode, group_size, targets)
    for path, kind in _plan(model, targets):
        if not _is_quantized(model.get_submodule(path)):
            _replace(model, path, kind, mode, group_size)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = GROUP_SIZE, targets=("experts",)) -> nn.Module:
    """Quantize an already-loaded model in place, module by module (each original weight is freed once
    quantized). Targets quantized earlier with the same settings are left as they are."""
    targets = check_options(mode, targets)
    _record(model, mode, group_size, targets)
    weights = dict(model.named_parameters())
    for path, kind in _plan(model, targets):
        if _is_quantized(model.get_submodule(path)):
            continue
        new = _replace(model, path, kind, mode, group_size)
        for name, (sub, transposed) in _weights_of(path, kind).items():
            w = weights.pop(name).detach()
            new.get_submodule(sub).set_weight(w.transpose(-1, -2) if transposed else w)
            del w
    return model


def quantizing_assign(model: nn.Module, mode: str, group_size: int = GROUP_SIZE, targets=("experts",)):
    """For checkpoint.load_model: return `store(model, name, tensor)`, which quantizes each target weight of
    the meta-built `model` as it streams in (swapping its module for a quantized one on first arrival) and
    assigns every other tensor as is. Only one full-precision tensor is alive at a time."""
    targets = check_options(mode, targets)
    _record(model, mode, group_size, targets)
    where = {name: (path, kind, sub, transposed) for path, kind in _plan(model, targets)
             for name, (sub, transposed) in _weights_of(path, kind).items()}

    def store(model: nn.Module, name: str, t: torch.Tensor) -> None:
        if name not in where:
            return checkpoint._assign(model, name, t)
        path, kind, sub, transposed = where[name]
        module = model.get_submodule(path)
        if not _is_quantized(module):
            module = _replace(model, path, kind, mode, group_size)
        module.get_submodule(sub).set_weight(t.transpose(-1, -2) if transposed else t)

    return store


def load_quantized(path: str | os.PathLike, mode: str, group_size: int = GROUP_SIZE, targets=("experts",),
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   vision: bool = False) -> nn.Module:
    """Load a checkpoint with the routed experts quantized while they stream in (checkpoint.load_model),
    then quantize any other targets in place: those are small, so the peak stays near the final size."""
    targets = check_options(mode, targets)
    on_the_fly = "experts" in targets
    model = checkpoint.load_model(path, device=device, dtype=dtype, vision=vision,
                                  quantize=mode if on_the_fly else None, group_size=group_size)
    rest = [t for t in targets if t != "experts"]
    if rest:
        quantize_model(model, mode, group_size, rest)
    return model


def stored_quantization(metadata: dict) -> dict:
    """The quantization settings recorded in a native checkpoint's safetensors metadata."""
    mode = metadata.get("quantization")
    try:
        group_size = int(metadata.get("group_size", GROUP_SIZE))
        targets = check_options(mode, metadata.get("quantized_modules", "experts").split(","))
    except ValueError as e:
        raise CheckpointError(f"model.safetensors: bad quantization metadata: {e}") from None
    return dict(mode=mode, group_size=group_size, targets=list(targets))


# --------------------------------------------------------------------------------------------------------
# Saving a quantized checkpoint (this project's layout; storage.py writes it tensor by tensor, atomically)
# --------------------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> None:
    """Write llama4.json + model.safetensors (packed tensors; mode and group size in its metadata) + the
    tokenizer file, into a temporary directory first, then renamed into place."""
    info = getattr(model, "quantization", None)
    if info is None:
        raise ValueError("the model is not quantized (use quantize_model or load_model(..., quantize=...))")
    if any(getattr(m, "layout", "plain") != "plain" for m in model.modules()):
        raise ValueError("int4 weights were repacked for the CUDA kernel: quantize and save on the CPU")
    with staged(path, tokenizer) as tmp:
        cfg = checkpoint.write_config(tmp, model.args)
        meta = {"format": "pt", "quantization": info["mode"], "group_size": str(info["group_size"]),
                "quantized_modules": ",".join(info["targets"]), "llama4_args": json.dumps(cfg)}  # see save_checkpoint
        write_safetensors(tmp / "model.safetensors", model.state_dict(), meta)


# --------------------------------------------------------------------------------------------------------
# The error report: stream each target tensor, quantize, measure
# --------------------------------------------------------------------------------------------------------

def _stream(path: Path):
    """(our name, tensor, release callback) for every text tensor of a checkpoint, one at a time."""
    layout = checkpoint.detect_layout(path)
    if layout == "meta":
        stream = checkpoint._stream_meta(path, checkpoint.load_args(path), False)
    else:
        stream = checkpoint.safetensors_stream(path, layout, False)
    for _, ours, t, done in stream:
        if ours is not None:
            yield ours, (t.join() if isinstance(t, checkpoint.Concat) else t), done  # Meta's shards, joined


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


@torch.no_grad()
def report(path: str | os.PathLike, mode: str, group_size: int = GROUP_SIZE, targets=("experts",),
           out=sys.stdout) -> dict:
    """Print, per target tensor, the relative RMS error ||w - deq|| / ||w|| and the largest |w - deq|, and
    the total bytes before/after. Returns the totals."""
    path = Path(path)
    if checkpoint.detect_layout(path) == "native":
        meta = SafetensorsFile(path / "model.safetensors").metadata
        if meta.get("quantization"):
            raise CheckpointError(f"{path} is already quantized ({meta['quantization']})")
    args = checkpoint.load_args(path)
    with torch.device("meta"):
        from model import Transformer
        model = Transformer(args)
    targets = check_options(mode, targets)
    where = {name: transposed for path, kind in _plan(model, targets)
             for name, (_, transposed) in _weights_of(path, kind).items()}
    before = after = 0
    print(f"{'tensor':<48} {'shape':>20} {'rel rms':>9} {'max abs':>9}", file=out)
    for name, t, done in _stream(path):
        nbytes = t.numel() * t.element_size()
        before += nbytes
        if name not in where:
            after += nbytes
        else:
            w = t.transpose(-1, -2) if where[name] else t  # [.., out, in]
            err2 = ref2 = worst = 0.0
            for m in (w if w.ndim == 3 else [w]):  # one expert at a time
                q, s = quantize(m, mode, group_size)
                after += q.numel() * q.element_size() + s.numel() * s.element_size()
                diff = m.float() - dequantize(q, s, mode)
                err2 += diff.pow(2).sum().item()
                ref2 += m.float().pow(2).sum().item()
                worst = max(worst, diff.abs().max().item())
            rel = (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
            print(f"{name:<48} {str(tuple(t.shape)):>20} {rel:9.2e} {worst:9.2e}", file=out)
        if done is not None:
            done()
    print(f"total bytes: {_size(before)} -> {_size(after)} ({after / max(before, 1):.3f}x) "
          f"with {mode} {', '.join(targets)}", file=out)
    return dict(before=before, after=after)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Quantize a Llama 4 checkpoint's weights (int4 group-wise or FP8 row-wise) into this "
                    "project's layout, or report the quantization error per tensor.",
        epilog="example: python quantize.py --ckpt Llama-4-Scout-17B-16E --mode int4 --out scout-int4")
    p.add_argument("--ckpt", required=True, help="input checkpoint directory (Hugging Face, Meta or native)")
    p.add_argument("--mode", choices=MODES, default="int4", help="int4: 4-bit groups along the input dim "
                   "(~0.26x of bf16); fp8: e4m3 with a scale per output row (0.5x)")
    p.add_argument("--out", help="write the quantized checkpoint to this directory")
    p.add_argument("--report", action="store_true", help="print per-tensor error and total bytes (text model)")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE, help="int4 group size (a power of two)")
    p.add_argument("--targets", default="experts",
                   help=f"comma-separated modules to quantize, from {','.join(TARGETS)} (default: experts; "
                        "the router, norms, embeddings and output head are never quantized)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="dtype of the tensors left unquantized "
                   "(default: as stored)")
    p.add_argument("--vision", action="store_true", help="keep the vision encoder (left unquantized) in --out")
    a = p.parse_args(argv)
    if not a.out and not a.report:
        p.error("nothing to do: give --out DIR and/or --report")
    if a.group_size < 2 or a.group_size & (a.group_size - 1):
        p.error(f"--group-size must be a power of two >= 2, got {a.group_size}")
    if a.out and Path(a.out).resolve() == Path(a.ckpt).resolve():
        p.error("--out must differ from --ckpt")
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    try:
        check_options(a.mode, targets)
        if a.report:
            report(a.ckpt, a.mode, a.group_size, targets)
        if a.out:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype)
            model = load_quantized(a.ckpt, a.mode, a.group_size, targets, dtype, vision=a.vision)
            save_quantized(model, a.out, tokenizer=Tokenizer.path_in(a.ckpt))
            q = sum(b.numel() * b.element_size() for b in model.state_dict().values())
            print(f"wrote {a.out}: {a.mode} ({', '.join(targets)}), {_size(q)}")
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

"""LoRA: fine-tune a frozen Llama 4 through small low-rank adapters (Hu et al., 2021).

A chosen projection y = W x gets a trainable detour: y = W x + (alpha / r) * B (A x), with A (r, in) and
B (out, r), r << in, out. Only A and B train; W stays frozen, bit for bit. B starts at zero, so step 0 is
exactly the base model. Afterwards the detour can be folded in, W' = W + (alpha / r) * B A, and the merged
model costs nothing extra at inference.

What is particular to doing this on Llama 4:

1. The projections are plain nn.Linear modules with checkpoint names, so targets are chosen by name:
   attention `wq`, `wk`, `wv`, `wo`; `w1`, `w2`, `w3` of the dense feed-forwards *and* of each MoE layer's
   shared expert. The routed experts are stacked (E, D, F) tensors, not nn.Linear: they are not adapted here
   (an adapter per expert would be E times the parameters, and most experts see few fine-tuning tokens).
2. The router stays frozen by default (and its load-balancing bias always does): changing it re-routes tokens
   to experts that were never trained for them. Name "router" as a target to adapt it anyway. Vision weights
   are never touched.
3. The adapted module keeps the name `weight` for the frozen matrix, so the base's parameter names do not
   change and `lora_A` / `lora_B` sit beside it: `layers.0.attention.wq.lora_A`.

QLoRA (Dettmers et al., 2023): the same adapters over a frozen int4 (or FP8) base. Load the base with its
routed experts quantized while they stream in, `checkpoint.load_model(path, dtype=torch.float32,
quantize="int4")`, then `add_lora(model, r, alpha, targets, quantize="int4")`: each targeted nn.Linear is
quantized into a `quantize.QuantizedLinear` (kept as `<name>.base`) and LoRALinear calls that frozen module
where plain LoRA computes `F.linear(x, self.weight)`. The adapters stay in full precision, and they are the
only tensors the optimizer sees. Gradients reach them through the frozen quantized layers (experts
included) by `quantize.FrozenMatmul`: grad_x = grad_y @ W, W dequantized again tile by tile in the
backward, never stored. On CUDA the model then skips the fused int4 / FP8 kernels, in evaluation too (they
have no backward, int4's layout cannot be read back, FP8's also rounds the activations). Merging
dequantizes W and adds (alpha / r) B A in full precision (see merge_lora). adapter_config.json records the
mode, so load_adapters rebuilds the same quantized structure.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantize import GROUP_SIZE, MODES, QuantizedLinear

LINEAR_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTERS_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen projection (no bias) plus a trainable rank-r update: W x + (alpha / r) * B (A x).

    The frozen W is an nn.Linear's weight, kept as `weight` (LoRA), or a QuantizedLinear, kept as the
    submodule `base` with its buffers `base.qweight`, `base.scale` (QLoRA). The adapters are created in
    `dtype` (default: the nn.Linear's dtype, fp32 over a quantized base).
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(base, QuantizedLinear):
            self.base, self.weight = base.requires_grad_(False), None
            out_features, in_features, device = base.out_features, base.in_features, base.qweight.device
            dtype = dtype or torch.float32
        else:
            if base.bias is not None:
                raise ValueError("LoRALinear expects a bias-free nn.Linear (Llama 4 has no biases)")
            self.base = None
            out_features, in_features = base.weight.shape
            self.weight = base.weight  # the same Parameter object: the base is not copied
            self.weight.requires_grad_(False)
            device, dtype = base.weight.device, dtype or base.weight.dtype
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper's code

    @property
    def quantize(self) -> str | None:
        return self.base.mode if self.base is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.base(x) if self.base is not None else F.linear(x, self.weight)
        return frozen + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B A, (out, in), in the adapters' dtype when W is quantized."""
        w = self.weight if self.base is None else self.base.dequantize(dtype=self.lora_A.dtype)
        return w + self.scale * (self.lora_B @ self.lora_A)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targets(model: nn.Module, targets) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent, attribute, module) of every nn.Linear named in `targets`, vision excluded."""
    found = []
    for name, module in model.named_modules():
        if name.startswith("vision"):
            continue
        for child_name, child in module.named_children():
            if child_name in targets and type(child) is nn.Linear:
                found.append((f"{name}.{child_name}" if name else child_name, module, child_name, child))
    return found


def _check_quantize(model: nn.Module, found, quantize: str, group_size: int) -> None:
    """Refuse, before the model changes, a mode or an int4 group size that cannot be honoured."""
    if quantize not in MODES:
        raise ValueError(f"unknown quantize mode {quantize!r} for QLoRA; choose from {', '.join(MODES)} "
                         "(or None for plain LoRA)")
    done = getattr(model, "quantization", None)
    if done is not None and (done["mode"] != quantize or (quantize == "int4" and done["group_size"] != group_size)):
        raise ValueError(f"the base is quantized to {done['mode']} (group {done['group_size']}); QLoRA asked for "
                         f"{quantize} (group {group_size}): load the base with the same settings")
    if quantize == "int4":
        if group_size < 2 or group_size & (group_size - 1):
            raise ValueError(f"int4 group size must be a power of two >= 2, got {group_size}")
        for name, _, _, child in found:
            if child.in_features % group_size:
                raise ValueError(f"int4 group size {group_size} does not divide the input dimension "
                                 f"{child.in_features} of {name}")


def _quantized(linear: nn.Linear, mode: str, group_size: int) -> QuantizedLinear:
    with torch.device("meta"):  # empty shell; set_weight allocates the buffers on the weight's device
        q = QuantizedLinear(linear.in_features, linear.out_features, mode, group_size)
    q.set_weight(linear.weight.detach())
    return q


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], quantize: str | None = None,
             group_size: int = GROUP_SIZE) -> list[str]:
    """Freeze every parameter of `model`, then wrap each nn.Linear named in `targets` with an adapter.

    Returns the adapted module names. Names are matched on the last part: "wq" adapts every layer's
    attention.wq; "w1" every dense feed-forward's and every shared expert's w1. With quantize "int4" or
    "fp8" (QLoRA) each of those nn.Linear is first replaced by a frozen QuantizedLinear (int4: groups of
    `group_size` along the input dimension, which it must divide).
    """
    unknown = sorted(set(targets) - set(LINEAR_TARGETS) - {"router"})
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(LINEAR_TARGETS)}, router "
                         "(routed experts are stacked tensors and cannot take adapters)")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    found = _targets(model, targets)
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in the model: nothing to adapt")
    if quantize is not None:
        _check_quantize(model, found, quantize, group_size)
    if any(m.layout != "plain" for m in model.modules() if isinstance(m, QuantizedLinear)):
        raise ValueError("int4 weights were repacked for the CUDA kernel by an earlier forward; "
                         "gradients cannot flow through them: add adapters before running the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, parent, child_name, child in found:
        frozen = _quantized(child, quantize, group_size) if quantize is not None else child
        setattr(parent, child_name, LoRALinear(frozen, rank, alpha, dtype=child.weight.dtype))
    for m in model.modules():  # the new ones and the routed experts: gradients will flow through them all
        if isinstance(m, QuantizedLinear):
            m.fused = False
    return [name for name, _, _, _ in found]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {'layers.0.attention.wq.lora_A': (r, in), ...}."""
    return {n: t.detach() for n, t in model.state_dict().items() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: each LoRALinear becomes a plain nn.Linear again.

    Over a quantized base (QLoRA) the merged weight is dequantize(W) + (alpha / r) B A in the adapters' full
    precision, and it stays so: re-quantizing it would round W + (alpha / r) B A again, an error of up to half
    a step per weight that the trained, unmerged model never had (its adapters learned to correct the
    quantized W, not a re-rounded one). The routed experts stay as they were loaded: a base loaded with
    quantize="int4" gives a merged model for quantize.save_quantized, which checkpoint.load_model reads."""
    for name, m in lora_modules(model).items():
        parent_name, _, child_name = name.rpartition(".")
        w = m.merged_weight()  # (out, in)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)
    for q in model.modules():  # no adapters left to train through: the fused CUDA kernels may serve again
        if isinstance(q, QuantizedLinear):
            q.fused = True
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged deep copy; the adapted model itself is left as it is (training goes on)."""
    return merge_lora(copy.deepcopy(model))


def save_adapters(model: nn.Module, directory: str | os.PathLike, config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json (rank, alpha, targets, base checkpoint, plus the
    `quantize` mode of the adapted base and its int4 `group_size`, read from the model) into a directory that
    nobody reads yet (train.py writes into a staging directory that is renamed into place afterwards)."""
    from safetensors.torch import save_file

    modes = {m.quantize for m in lora_modules(model).values()}
    groups = {m.base.group_size for m in lora_modules(model).values() if m.quantize == "int4"}
    if len(modes) > 1 or len(groups) > 1:
        raise ValueError(f"adapters over mixed bases ({sorted(map(str, modes))}, groups {sorted(groups)}) "
                         "cannot be described by one adapter config")
    quantize = modes.pop() if modes else None
    config = {**config, "quantize": quantize}  # the model, not the caller, says how its base is quantized
    if quantize == "int4":
        config["group_size"] = groups.pop()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous().cpu() for n, t in lora_state_dict(model).items()}, directory / ADAPTERS_FILE)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Add adapters to a base model as described by DIR/adapter_config.json and load DIR/adapters.safetensors.
    Adapters trained with QLoRA are added over the same quantization (int4 / fp8, group size) they saw.

    Strict: every adapter tensor must exist with the right shape. Returns the adapter config.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        rank, alpha, targets = int(config["rank"]), float(config["alpha"]), list(config["targets"])
        quantize, group_size = config.get("quantize"), int(config.get("group_size", GROUP_SIZE))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: not a readable LoRA adapter config ({e})") from None
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: unknown quantize mode {quantize!r}")
    present = {m.quantize for m in lora_modules(model).values()}
    if not present:
        add_lora(model, rank, alpha, targets, quantize=quantize, group_size=group_size)
    elif present != {quantize}:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: adapters trained over a {quantize or 'full-precision'} "
                         f"base, but the model's adapters sit on {', '.join(sorted(map(str, present)))}")
    saved = load_file(directory / ADAPTERS_FILE)
    expected = lora_state_dict(model)
    if set(saved) != set(expected):
        diff = sorted(set(saved) ^ set(expected))
        raise ValueError(f"{directory / ADAPTERS_FILE}: adapter names do not match the model: {diff[:4]}")
    for name, t in saved.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{directory / ADAPTERS_FILE}: {name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(expected[name].shape)}")
    model.load_state_dict(saved, strict=False)
    return config

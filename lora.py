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
2. The router stays frozen (and so does its load-balancing bias): changing it re-routes tokens to experts
   that were never trained for them. Vision weights are never touched.
3. The adapted module keeps the name `weight` for the frozen matrix, so the base's parameter names do not
   change and `lora_A` / `lora_B` sit beside it: `layers.0.attention.wq.lora_A`.

QLoRA (adapters over an int4 base) is not here yet. The way there: load the base with
`checkpoint.load_model(..., quantize="int4")`, quantize the targeted projections as well (today quantize.py
does the routed experts, which LoRA leaves alone) with `quantize.QuantizedLinear`, and have LoRALinear call
that frozen module where it now computes `F.linear(x, self.weight)`. The adapters stay in full precision;
merging becomes dequantize, add B A, re-quantize (which adds rounding error the unmerged model does not have).
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

LINEAR_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTERS_FILE, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen nn.Linear (no bias) plus a trainable rank-r update: W x + (alpha / r) * B (A x)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear expects a bias-free nn.Linear (Llama 4 has no biases)")
        out_features, in_features = base.weight.shape
        self.weight = base.weight  # the same Parameter object: the base is not copied
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the LoRA paper's code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B A, (out, in)."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Freeze every parameter of `model`, then wrap each nn.Linear named in `targets` with an adapter.

    Returns the adapted module names. Names are matched on the last part: "wq" adapts every layer's
    attention.wq; "w1" every dense feed-forward's and every shared expert's w1.
    """
    unknown = sorted(set(targets) - set(LINEAR_TARGETS) - {"router"})
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(LINEAR_TARGETS)} "
                         "(routed experts are stacked tensors and cannot take adapters)")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if name.startswith("vision"):
            continue
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                adapted.append(f"{name}.{child_name}" if name else child_name)
    if not adapted:
        raise ValueError(f"no nn.Linear named {targets} in the model: nothing to adapt")
    return adapted


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {'layers.0.attention.wq.lora_A': (r, in), ...}."""
    return {n: t.detach() for n, t in model.state_dict().items() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: each LoRALinear becomes a plain nn.Linear again."""
    for name, m in lora_modules(model).items():
        parent_name, _, child_name = name.rpartition(".")
        out_features, in_features = m.weight.shape
        linear = nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, linear)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged deep copy; the adapted model itself is left as it is (training goes on)."""
    return merge_lora(copy.deepcopy(model))


def save_adapters(model: nn.Module, directory: str | os.PathLike, config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json (rank, alpha, targets, base checkpoint) into a directory
    that nobody reads yet (train.py writes into a staging directory that is renamed into place afterwards)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous().cpu() for n, t in lora_state_dict(model).items()}, directory / ADAPTERS_FILE)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Add adapters to a base model as described by DIR/adapter_config.json and load DIR/adapters.safetensors.

    Strict: every adapter tensor must exist with the right shape. Returns the adapter config.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        rank, alpha, targets = int(config["rank"]), float(config["alpha"]), list(config["targets"])
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: not a readable LoRA adapter config ({e})") from None
    if not lora_modules(model):
        add_lora(model, rank, alpha, targets)
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

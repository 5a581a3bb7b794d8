"""Loading Llama 4 checkpoints, exactly as downloaded, and saving this project's own.

Three layouts are read, each into the same `model.Transformer`:

- Hugging Face (`config.json` + `model.safetensors`, or shards listed in `model.safetensors.index.json`):
  names like `language_model.model.layers.0.self_attn.q_proj.weight`; the routed experts come fused,
  `experts.gate_up_proj` (E, D, 2F) holding w1 then w3, and `experts.down_proj` (E, F, D).
- Meta's original (`params.json` + `consolidated.NN.pth`): the release is split into model-parallel shards
  (8 of them), each holding a slice of every large matrix; q/k/v come fused per shard as `wqkv`, the dense
  FFN's w1/w3 as `fc1_weight`, the experts flattened as `moe_w_in_eD_F` (E*D, F/shards).
- This project's (`llama4.json` + `model.safetensors` with our own names), written by `save_checkpoint`.

Scout is 218 GB in bf16, so loading never holds two copies: the model is built on the "meta" device (shapes,
no memory), then each tensor is read from a memory-mapped file (storage.py), copied to its place (device,
dtype, quantized on the fly if asked), and the file's pages are handed back to the kernel before the next one.
On the CPU, a tensor already in the asked dtype is not copied at all: the model keeps a view of the mapped
file (zero copy), and the kernel reads its pages the first time they are used. The mapping is private
(copy-on-write, MAP_PRIVATE), so training may update such weights in place: the writes go to this process's
own copies of the pages, never to the file. Each view holds a reference to its mapping, which stays open as
long as any of its tensors lives; `save_checkpoint` replaces files by renaming, which leaves a mapped file's
bytes as they were. (A program that rewrites a checkpoint file in place while a model still views it would
change, or with a shorter file crash, that model: load with `zero_copy=False` then.)

Loading is strict. A missing, unexpected or mis-shaped tensor is an error that names it (Meta's reference
loads with strict=False, which silently leaves garbage weights). `.pth` files are read with
`weights_only=True` (storage.load_pth): a checkpoint can never run code.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from model import ModelArgs, Transformer
from moe import MoE
from storage import CheckpointError, SafetensorsFile, load_pth, release, staged, trim_heap


# --------------------------------------------------------------------------------------------------------
# Configs: config.json (Hugging Face), params.json (Meta), llama4.json (ours)
# --------------------------------------------------------------------------------------------------------

def _rope_scaling_hf(cfg: dict) -> tuple[float, dict | None]:
    """Read RoPE theta and llama3 scaling from either the Hub style (rope_theta + rope_scaling) or the
    transformers 5 style (rope_parameters holding both)."""
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 500000.0))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return theta, None
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise CheckpointError(f"rope scaling type {scaling.get('rope_type')!r} is not Llama 4's (llama3)")
    return theta, dict(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                       high_freq_factor=float(scaling["high_freq_factor"]),
                       original_context=int(scaling["original_max_position_embeddings"]))


def args_from_hf(cfg: dict) -> ModelArgs:
    top = cfg
    cfg = cfg.get("text_config", cfg)
    if cfg.get("attention_bias"):
        raise CheckpointError("config.json: attention_bias=true is not a Llama 4 layout")
    n_layers = cfg["num_hidden_layers"]
    theta, scaling = _rope_scaling_hf(cfg)
    nope = None
    if cfg.get("no_rope_layers"):  # 1 = RoPE layer, 0 = NoPE layer
        nope = [i for i, r in enumerate(cfg["no_rope_layers"][:n_layers]) if not r]
    elif cfg.get("layer_types"):
        nope = [i for i, t in enumerate(cfg["layer_types"][:n_layers]) if t == "full_attention"]
    step = cfg.get("interleave_moe_layer_step", 1)
    moe_layers = cfg.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layers, step))
    heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=n_layers, n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        n_experts=cfg.get("num_local_experts", 16), top_k=cfg.get("num_experts_per_tok", 1),
        moe_hidden_dim=cfg.get("intermediate_size", 8192), ffn_hidden_dim=cfg.get("intermediate_size_mlp", 16384),
        interleave_moe_layer_step=step, moe_layers=list(moe_layers),
        use_qk_norm=bool(cfg.get("use_qk_norm", True)), rope_theta=theta, rope_scaling=scaling,
        nope_layer_interval=cfg.get("no_rope_layer_interval", 4), nope_layers=nope,
        attention_chunk_size=cfg.get("attention_chunk_size", 8192),
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),  # the Hub writes 4 for "on"
        floor_scale=float(cfg.get("floor_scale", 8192)), attn_scale=float(cfg.get("attn_scale", 0.1)),
        max_seq_len=cfg.get("max_position_embeddings", 131072),
        image_token_id=top.get("image_token_index", top.get("image_token_id", 200092)),
    )


def _meta_hidden_dims(p: dict) -> tuple[int, int]:
    """Meta's sizing rule (params.json has no hidden sizes): 2/3 of 4*dim (or ffn_exp*dim for experts) for
    SwiGLU, times ffn_dim_multiplier, experts further divided by capacity_factor + 1 (auto_scale_F), each step
    truncated to an int, then rounded up to a multiple of multiple_of. Scout: 16384 dense, 8192 experts."""
    mult, multiple_of = p.get("ffn_dim_multiplier"), p.get("multiple_of", 256)
    moe = p.get("moe_args") or {}

    def size(h: int, denom: float = 1.0) -> int:
        h = int(2 * h / 3)
        if mult is not None:
            h = int(mult * h)
        h = int(h / denom)
        return (h + multiple_of - 1) // multiple_of * multiple_of

    dense = size(int(4 * p["dim"]))
    denom = moe.get("capacity_factor", 1.0) + 1 if moe.get("auto_scale_F", True) else 1.0
    expert = size(int((p.get("ffn_exp") or 4.0) * p["dim"]), denom)
    return dense, expert


def args_from_meta(p: dict) -> ModelArgs:
    moe = p.get("moe_args") or {}
    dense, expert = _meta_hidden_dims(p)
    scaling = None
    if p.get("use_scaled_rope"):  # Meta's defaults for Scout: factor 16, high 1; low 1 and 8192 are fixed
        scaling = dict(factor=float(p.get("rope_scaling_factor") or 16), low_freq_factor=1.0,
                       high_freq_factor=float(p.get("rope_high_freq_factor") or 1), original_context=8192)
    interval = p.get("nope_layer_interval")
    return ModelArgs(
        dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        head_dim=p["dim"] // p["n_heads"], vocab_size=p["vocab_size"], norm_eps=p.get("norm_eps", 1e-5),
        n_experts=moe.get("num_experts", 0) if moe else 0, top_k=moe.get("top_k", 1),
        moe_hidden_dim=expert, ffn_hidden_dim=dense,
        interleave_moe_layer_step=moe.get("interleave_moe_layer_step", 1),
        use_qk_norm=p.get("use_qk_norm", False), rope_theta=p.get("rope_theta", 500000.0), rope_scaling=scaling,
        nope_layer_interval=interval or 0,
        attention_chunk_size=p.get("attention_chunk_size"),
        attn_temperature_tuning=p.get("attn_temperature_tuning", False),
        floor_scale=float(p.get("floor_scale", 8192.0)), attn_scale=float(p.get("attn_scale", 0.1)),
        max_seq_len=p.get("max_seq_len", 131072),
    )


def args_from_native(d: dict) -> ModelArgs:
    d = dict(d)
    known = {f.name for f in fields(ModelArgs)}
    unknown = set(d) - known - {"format"}
    if unknown:
        raise CheckpointError(f"llama4.json: unknown fields {sorted(unknown)}")
    d.pop("format", None)
    if d.get("vision") is not None:
        from vision import VisionArgs
        d["vision"] = VisionArgs(**d["vision"])
    return ModelArgs(**d)


def _vision_args(path: Path, layout: str, cfg: dict, text: ModelArgs):
    from vision import VisionArgs
    section = "vision_config" if layout == "hf" else "vision_args"
    if not cfg.get(section):
        raise CheckpointError(f"{path}: the config has no {section}: a text-only checkpoint")
    try:
        make = VisionArgs.from_hf if layout == "hf" else VisionArgs.from_meta
        return make(cfg[section], text.dim)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {section}: {e}") from None


# --------------------------------------------------------------------------------------------------------
# Layouts: which files, and how their tensor names map onto ours
# --------------------------------------------------------------------------------------------------------

def detect_layout(path: Path) -> str:
    if (path / "llama4.json").is_file():
        return "native"
    if (path / "config.json").is_file() and (list(path.glob("*.safetensors")) or
                                             (path / "model.safetensors.index.json").is_file()):
        return "hf"
    if (path / "params.json").is_file() and list(path.glob("consolidated.*.pth")):
        return "meta"
    what = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
    raise CheckpointError(
        f"{path} is not a Llama 4 checkpoint: looked for config.json + *.safetensors (Hugging Face), "
        f"params.json + consolidated.NN.pth (Meta) or llama4.json + model.safetensors (this project); "
        f"found {what if path.is_dir() else 'no such directory'}")


def load_args(path: str | os.PathLike, vision: bool = False) -> ModelArgs:
    path = Path(path)
    layout = detect_layout(path)
    cfg_file = {"native": "llama4.json", "hf": "config.json", "meta": "params.json"}[layout]
    weights = path / "model.safetensors"
    if layout == "native" and weights.is_file() and "llama4_args" in SafetensorsFile(weights).metadata:
        cfg_file = "model.safetensors"  # the weights carry their own config: they can never disagree
    try:
        if cfg_file == "model.safetensors":
            cfg = json.loads(SafetensorsFile(weights).metadata["llama4_args"])
        else:
            cfg = json.loads((path / cfg_file).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / cfg_file}: not valid JSON ({e})") from None
    try:
        args = {"native": args_from_native, "hf": args_from_hf, "meta": args_from_meta}[layout](cfg)
    except KeyError as e:
        raise CheckpointError(f"{path / cfg_file}: missing field {e}") from None
    if layout == "native" and not vision:
        args.vision = None
    elif layout != "native":
        args.vision = _vision_args(path, layout, cfg, args) if vision else None
    elif vision and args.vision is None:
        raise CheckpointError(f"{path}: this checkpoint has no vision weights")
    return args


# A rename rule: regex on the checkpoint name -> our name (with \1 for the layer) and how to cut the tensor.
Piece = tuple[str, Callable[[torch.Tensor], torch.Tensor]]
_same = lambda t: t  # noqa: E731

_HF_TEXT = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.router\.weight", r"layers.\1.feed_forward.router.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.experts\.down_proj", r"layers.\1.feed_forward.experts.w2"),
    (r"model\.layers\.(\d+)\.feed_forward\.(shared_expert\.)?gate_proj\.weight", r"layers.\1.feed_forward.\2w1.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.(shared_expert\.)?up_proj\.weight", r"layers.\1.feed_forward.\2w3.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.(shared_expert\.)?down_proj\.weight", r"layers.\1.feed_forward.\2w2.weight"),
]


def hf_pieces(key: str, vision: bool) -> list[Piece] | None:
    """Our name(s) for a Hugging Face tensor name; None = not a weight we use (vision when not asked for)."""
    if key.startswith(("vision_model.", "multi_modal_projector.")):
        if not vision:
            return None
        from vision import vision_key_from_hf
        try:
            ours = vision_key_from_hf(key)
        except KeyError:
            ours = None
        return [("vision." + ours, _same)] if ours else []  # [] = unknown: reported as unexpected
    key = key.removeprefix("language_model.")
    m = re.fullmatch(r"model\.layers\.(\d+)\.feed_forward\.experts\.gate_up_proj", key)
    if m:  # (E, D, 2F): gate (w1) first, then up (w3)
        prefix = f"layers.{m[1]}.feed_forward.experts."
        return [(prefix + "w1", lambda t: t[..., : t.shape[-1] // 2]),
                (prefix + "w3", lambda t: t[..., t.shape[-1] // 2:])]
    for pattern, ours in _HF_TEXT:
        if re.fullmatch(pattern, key):
            return [(re.sub(pattern, ours, key).replace("..", "."), _same)]
    return []  # unknown: reported as unexpected


class Concat:
    """The model-parallel shards of one tensor, joined along `dim` only when copied into their destination,
    so merging a sharded checkpoint makes no temporary full-size copy."""

    def __init__(self, parts: list[torch.Tensor], dim: int):
        self.parts, self.dim = list(parts), dim
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape, self.dtype = torch.Size(shape), parts[0].dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def copy_into(self, dest: torch.Tensor) -> torch.Tensor:
        offset = 0
        for p in self.parts:
            dest.narrow(self.dim, offset, p.shape[self.dim]).copy_(p)
            offset += p.shape[self.dim]
        return dest

    def join(self) -> torch.Tensor:
        return torch.cat(self.parts, self.dim)


def _cat(parts: list[torch.Tensor], dim: int):
    return parts[0] if len(parts) == 1 else Concat(parts, dim)


# Meta: our name, and how the model-parallel shards were cut: dim to concatenate on (None = replicated).
_META_TEXT = [
    (r"tok_embeddings\.weight", "tok_embeddings.weight", 0),
    (r"norm\.weight", "norm.weight", None),
    (r"output\.weight", "output.weight", 0),
    (r"layers\.(\d+)\.attention\.wqkv\.layer_norm_weight", r"layers.\1.attention_norm.weight", None),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"layers.\1.attention.wo.weight", 1),
    (r"layers\.(\d+)\.feed_forward\.norm\.weight", r"layers.\1.ffn_norm.weight", None),
    (r"layers\.(\d+)\.feed_forward\.mlp\.layer_norm_weight", r"layers.\1.ffn_norm.weight", None),
    (r"layers\.(\d+)\.feed_forward\.mlp\.fc2_weight", r"layers.\1.feed_forward.w2.weight", 1),
    (r"layers\.(\d+)\.feed_forward\.w_in_shared_FD\.weight", r"layers.\1.feed_forward.shared_expert.w1.weight", 0),
    (r"layers\.(\d+)\.feed_forward\.w_swiglu_FD\.weight", r"layers.\1.feed_forward.shared_expert.w3.weight", 0),
    (r"layers\.(\d+)\.feed_forward\.w_out_shared_DF\.weight", r"layers.\1.feed_forward.shared_expert.w2.weight", 1),
]
_META_IGNORED = re.compile(r"rope\.freqs|.*\._extra_state|.*(global_gate_stats_3E|expert_activation_DE|"
                           r"running_gate_stats_3E)")


def meta_merge(key: str, shards: list[torch.Tensor], args: ModelArgs, vision: bool) -> list[tuple] | None:
    """Our tensor(s) from one Meta tensor's model-parallel shards: [(our name, tensor or Concat of shards)].
    None = not a weight we use; [] = unknown."""
    if _META_IGNORED.fullmatch(key):
        return None
    if key.startswith(("vision_embeddings.", "vision_projection.")):
        if not vision:
            return None
        from vision import vision_key_from_meta, vision_meta_shard_dim
        try:
            ours, dim = vision_key_from_meta(key), vision_meta_shard_dim(key)
        except KeyError:
            return []  # unknown: reported as unexpected
        if ours is None:
            return None
        return [("vision." + ours, shards[0] if dim is None else _cat(shards, dim))]
    E, D = args.n_experts, args.dim
    m = re.fullmatch(r"layers\.(\d+)\.(attention\.wqkv\.weight|feed_forward\.mlp\.fc1_weight|"
                     r"feed_forward\.router_DE|feed_forward\.experts\.(moe_w_in_eD_F|moe_w_swiglu_eD_F|moe_w_out_eF_D))", key)
    if m:
        pre, what = f"layers.{m[1]}.", m[2]
        if what == "attention.wqkv.weight":  # each shard: its q rows, then its k rows, then its v rows
            hd, n = args.head_dim, len(shards)
            split = [args.n_heads * hd // n, args.n_kv_heads * hd // n, args.n_kv_heads * hd // n]
            q, k, v = zip(*(s.split(split, 0) for s in shards))
            return [(pre + "attention.wq.weight", _cat(q, 0)), (pre + "attention.wk.weight", _cat(k, 0)),
                    (pre + "attention.wv.weight", _cat(v, 0))]
        if what == "feed_forward.mlp.fc1_weight":  # each shard: its w1 rows, then its w3 rows
            w1, w3 = zip(*(s.chunk(2, 0) for s in shards))
            return [(pre + "feed_forward.w1.weight", _cat(w1, 0)), (pre + "feed_forward.w3.weight", _cat(w3, 0))]
        if what == "feed_forward.router_DE":  # (D, E), replicated; ours is an nn.Linear weight (E, D)
            return [(pre + "feed_forward.router.weight", shards[0].t())]
        ours = {"moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3", "moe_w_out_eF_D": "w2"}[m[3]]
        if m[3] == "moe_w_out_eF_D":  # (E*F/n, D) per shard -> (E, F, D)
            return [(pre + "feed_forward.experts.w2", _cat([s.view(E, -1, D) for s in shards], 1))]
        return [(pre + "feed_forward.experts." + ours, _cat([s.view(E, D, -1) for s in shards], 2))]
    for pattern, ours, dim in _META_TEXT:
        if re.fullmatch(pattern, key):
            return [(re.sub(pattern, ours, key), shards[0] if dim is None else _cat(shards, dim))]
    return []  # unknown: reported as unexpected


# --------------------------------------------------------------------------------------------------------
# Streaming the tensors of a checkpoint into a model built on the meta device
# --------------------------------------------------------------------------------------------------------

def _hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {index.name} are missing: {missing}")
        return files
    return sorted(path.glob("*.safetensors"))


def _stream_safetensors(files: list[Path], rename: Callable[[str], list[Piece] | None]) -> Iterator:
    """Yield (checkpoint name, our name, tensor view, release callback), one tensor at a time."""
    for f in files:
        st = SafetensorsFile(f)
        for key in st.keys():
            pieces = rename(key)
            if pieces is None:
                continue
            if not pieces:
                yield key, None, None, None
                continue
            t = st.tensor(key)
            for i, (ours, cut) in enumerate(pieces):
                yield key, ours, cut(t), (lambda t=t: release(t)) if i == len(pieces) - 1 else None


def safetensors_stream(path: Path, layout: str, vision: bool) -> Iterator:
    """The tensors of an HF or native checkpoint directory under our names (vision ones only if asked for)."""
    if layout == "native":
        return _stream_safetensors([path / "model.safetensors"],
                                   lambda k: [(k, _same)] if vision or not k.startswith("vision.") else None)
    return _stream_safetensors(_hf_files(path), lambda k: hf_pieces(k, vision))


def _stream_meta(path: Path, args: ModelArgs, vision: bool, merge: Callable | None = None) -> Iterator:
    """(key, our name, tensor or Concat, release) for each tensor of Meta's shards. `merge(key, parts)` turns
    one key's shard parts into [(our name, tensor)] (None: skip; []: unexpected); by default meta_merge
    joins them whole (parallel.py passes one that keeps only a rank's block)."""
    merge = merge or (lambda key, parts: meta_merge(key, parts, args, vision))
    files = sorted(path.glob("consolidated.*.pth"))
    shards = [load_pth(f) for f in files]
    keys = list(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            odd = sorted(set(s) ^ set(keys))[:5]
            raise CheckpointError(f"{files[i].name} and {files[0].name} hold different tensors, e.g. {odd}")
    for key in keys:
        parts = [s[key] for s in shards]
        try:
            merged = merge(key, parts)
        except RuntimeError as e:
            raise CheckpointError(f"{key}: shards of shape {tuple(parts[0].shape)} do not fit this model "
                                  f"({str(e).splitlines()[0][:160]})") from None
        if merged is None:
            continue
        if not merged:
            yield key, None, None, None
        for i, (ours, t) in enumerate(merged):
            yield key, ours, t, (lambda parts=parts: [release(p) for p in parts]) if i == len(merged) - 1 else None


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = t


def fill(model: nn.Module, stream: Iterator, device, dtype: torch.dtype | None, path: Path, store=_assign,
         keep_dtype: tuple[str, ...] = (), where: str = "", zero_copy: bool = False) -> set[str]:
    """Copy every (checkpoint name, our name, tensor, release) of `stream` into the meta-built `model`, strictly:
    each tensor must have a place of the right shape, exactly once, and every place must be filled. Each
    tensor is copied once, to its device and dtype (names ending in keep_dtype keep theirs), then its file
    pages are released. With zero_copy (CPU only), a tensor that is already in its final dtype is stored as
    the memory-mapped view itself, and its pages stay mapped. Returns the names of those views."""
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    optional = {n for n in expected if n.endswith("expert_bias")}  # only our own checkpoints carry it
    zero_copy = zero_copy and torch.device(device).type == "cpu"
    loaded, unexpected, views = set(), [], set()
    for key, ours, t, done in stream:
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if tuple(t.shape) != expected[ours]:
            raise CheckpointError(f"{key}: shape {tuple(t.shape)} does not fit {ours} {expected[ours]} ({where})")
        if ours in loaded:
            raise CheckpointError(f"{key}: {ours} appears twice in the checkpoint")
        keep = dtype is None or not t.is_floating_point() or ours.endswith(keep_dtype)
        if zero_copy and (keep or t.dtype == dtype) and not isinstance(t, Concat):
            value = t  # a view of the mapped file: nothing is read until it is used
        else:
            dest = torch.empty(t.shape, dtype=t.dtype if keep else dtype, device=device)
            value = t.copy_into(dest) if isinstance(t, Concat) else dest.copy_(t)  # the one copy
        if isinstance(t, torch.Tensor) and value.data_ptr() == t.data_ptr():
            views.add(ours)
        store(model, ours, value)
        loaded.add(ours)
        if done is not None and ours not in views:  # (pages that a model tensor views stay mapped)
            done()
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) that this model has no place for: "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    missing = sorted(set(expected) - loaded - optional)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, shape in expected.items():  # optional buffers that the checkpoint did not carry
        if name not in loaded:
            _assign(model, name, torch.zeros(shape, device=device, dtype=dtype or torch.float32))
    for m in model.modules():  # the MoE load counters: training bookkeeping, not in any checkpoint
        if isinstance(m, MoE):
            m.tokens_per_expert = torch.zeros(m.n_experts, device=device)
    return views


def _native_quantization(path: Path) -> dict | None:
    """The settings of a native checkpoint written by quantize.py (safetensors metadata), else None."""
    f = path / "model.safetensors"
    if not f.is_file() or not SafetensorsFile(f).metadata.get("quantization"):
        return None
    from quantize import stored_quantization
    return stored_quantization(SafetensorsFile(f).metadata)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               vision: bool = False, quantize: str | None = None, group_size: int = 128,
               zero_copy: bool = True, for_decode: bool = False, compile: bool = False) -> Transformer:
    """Build a Transformer from a checkpoint directory in any of the three layouts, in eval mode.

    dtype None keeps the stored dtype. vision=True also loads the image encoder (multimodal checkpoints).
    quantize "int4" / "fp8" quantizes the expert weights as they stream in (see quantize.py).
    zero_copy: on the CPU, tensors stored in the dtype asked for stay views of the memory-mapped files
    (copy-on-write; see the module docstring); False copies every tensor into memory of its own. (A Hugging
    Face checkpoint's expert w1 / w3 are then strided halves of its fused gate_up_proj: their products round
    differently, ~1e-7 relative, from those of contiguous copies.)
    for_decode: for inference on the CPU, fuse and pack the text weights (cpu_decode.prepare_for_decode),
    releasing the file pages of each weight packed: peak memory stays at about the checkpoint's size.
    compile: with for_decode, fuse without packing and decode single tokens through one compiled graph per step
    (cpu_decode.CompiledSteps: ~2x the tokens/s at batch 1; compiled at the first step).
    """
    if compile and not for_decode:
        raise ValueError("compile=True prepares decoding on the CPU: it goes with for_decode=True")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    layout = detect_layout(path)
    args = load_args(path, vision=vision)
    with torch.device("meta"):
        model = Transformer(args)
    stored = _native_quantization(path) if layout == "native" else None
    if stored:  # written by quantize.py: swap in the quantized modules, then load their packed tensors strictly
        from quantize import swap_in_quantized
        if quantize and quantize != stored["mode"]:
            raise CheckpointError(f"{path} is already quantized to {stored['mode']}; it cannot be loaded as {quantize}")
        swap_in_quantized(model, stored["mode"], stored["group_size"], stored["targets"])
        quantize = None
    store = _assign
    if quantize:
        from quantize import quantizing_assign
        store = quantizing_assign(model, quantize, group_size)

    stream = _stream_meta(path, args, vision) if layout == "meta" else safetensors_stream(path, layout, vision)

    # Quantizing on the fly reads each expert once and keeps only its quantized form: those pages are released.
    views = fill(model, stream, device, dtype, path, store, keep_dtype=(".qweight", ".scale") if stored else (),
                 where=f"config says dim {args.dim}, {args.n_experts} experts", zero_copy=zero_copy and not quantize)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a model tensor that no checkpoint fills: a bug in this file, not in the checkpoint
        raise CheckpointError(f"internal: tensors left without values after loading: {left[:5]}")
    if for_decode:
        from cpu_decode import prepare_for_decode
        mapped = {t.data_ptr() for n, t in model.named_parameters() if n in views}

        def done(w: torch.Tensor) -> None:  # a weight packed: its file pages and its temporaries go back
            if w.data_ptr() in mapped:
                release(w)
            trim_heap()

        prepare_for_decode(model, done=done, compile=compile)
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Saving this project's own layout
# --------------------------------------------------------------------------------------------------------

def write_config(directory: Path, args: ModelArgs) -> dict:
    """Write `llama4.json` (the ModelArgs and the format's name) into `directory`; return what was written."""
    cfg = asdict(args)
    cfg["format"] = "llama4-minimal/1"
    (directory / "llama4.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def save_checkpoint(model: Transformer, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> None:
    """Write `llama4.json` + `model.safetensors` (+ the tokenizer file) so that a crash at any moment leaves a
    loadable checkpoint (see `storage.staged`)."""
    from safetensors.torch import save_file

    with staged(path, tokenizer) as tmp:
        cfg = write_config(tmp, model.args)
        state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
        # The config goes into the weights file too, so a crash between the renames of `storage.publish` can
        # never pair new weights with an old config (or the reverse): load_args reads it from there.
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "llama4_args": json.dumps(cfg)})


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Inspect a Llama 4 checkpoint directory (HF, Meta or this project's): "
                                            "print its layout and configuration, and optionally load it.")
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--load", action="store_true", help="also load every tensor (strict) and count parameters")
    p.add_argument("--vision", action="store_true", help="include the vision encoder")
    a = p.parse_args()
    try:
        path = Path(a.ckpt)
        print(f"layout: {detect_layout(path)}")
        print(load_args(path, vision=a.vision))
        if a.load:
            from model import param_counts
            print(param_counts(load_model(path, vision=a.vision)))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()

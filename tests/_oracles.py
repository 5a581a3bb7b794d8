"""Builders shared by the parity tests: tiny random checkpoints written by the two reference implementations.

- `randomize_(module, seed)`: seeded weights of a useful size (unit-variance activations), so that attention
  patterns are sharp and a wrong rotation, mask or scale moves the logits far beyond the test tolerance.
- Hugging Face: `hf_text_config(...)` builds a tiny `Llama4TextConfig`; `hub_style(cfg)` rewrites a
  transformers-5 `config.json` into the style of the configs published on the Hub (`rope_theta` +
  `rope_scaling`, `no_rope_layers`, `attn_temperature_tuning: 4`).
- Meta: `meta_parallel()` starts the one-process model-parallel group Meta's layers need on CPU;
  `build_meta(params)` makes `llama_models.llama4.model.Transformer`; `write_meta_release(dir, params, state)`
  writes its weights in the raw released layout (model-parallel shards `consolidated.NN.pth` + `params.json`),
  and `load_meta_release(dir, params)` reads them back with Meta's own shard merge and load hooks.

The shard writer is written from the key-name section of /work/shared/llama4-facts.md, not from our loader:
`load_meta_release` checks it against Meta's merge, so the two loaders under test read an independently
verified file.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from a seeded generator: vectors (norm weights, biases) ~ 1 + 0.1 N(0, 1),
    matrices and stacked experts ~ N(0, 1 / shape[1]) (shape[1] is the input width of an nn.Linear [out, in]
    and of an expert stored (E, in, out))."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(noise / p.shape[1] ** 0.5)
    return module


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------------

# Tiny sizes shared by all HF tests: head_dim 16 -> 8 RoPE frequencies.
HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
               rms_norm_eps=1e-5, attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=4,
               attn_scale=0.1, max_position_embeddings=4096)


def hf_text_config(rope_parameters: dict, **overrides):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(**{**HF_TINY, **overrides}, rope_parameters=rope_parameters)


def hub_style(cfg: dict) -> dict:
    """A transformers-5 config.json (text part) rewritten the way the Hub's Llama 4 configs are written:
    `rope_theta` at the top and a `rope_scaling` dict (or null), `no_rope_layers` as the only layer schedule
    (no `layer_types`), and `attn_temperature_tuning: 4` (an int meaning "on")."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg.pop("layer_types", None)
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    assert cfg["no_rope_layers"], "transformers writes the 0/1 RoPE list; the Hub config has it too"
    if cfg.get("attn_temperature_tuning"):
        cfg["attn_temperature_tuning"] = 4
    return cfg


# --------------------------------------------------------------------------------------------------------
# Meta's reference (llama_models.llama4)
# --------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def meta_parallel():
    """A one-process gloo group + fairscale model parallelism of 1, and `.cuda()` made a no-op (Meta's KV
    caches call it). Reuses a group another test already started; undoes only what it did."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    started = not dist.is_initialized()
    tmp = tempfile.mkdtemp(prefix="gloo-") if started else None
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    mp_started = not fs_init.model_parallel_is_initialized()
    if mp_started:
        fs_init.initialize_model_parallel(1)
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda
        if mp_started:
            fs_init.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
            shutil.rmtree(tmp, ignore_errors=True)


def meta_model_args(params: dict, max_seq_len: int = 64, max_batch_size: int = 2):
    from llama_models.llama4.args import ModelArgs

    return ModelArgs(**{**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})


def build_meta(params: dict, max_seq_len: int = 64, max_batch_size: int = 2):
    """Meta's Transformer in fp32 (its parameters are torch.empty: randomize or load them)."""
    from llama_models.llama4.model import Transformer

    assert torch.get_default_dtype() == torch.float32
    return Transformer(meta_model_args(params, max_seq_len, max_batch_size)).eval()


def meta_forward(model, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Meta's forward (under inference_mode, caches kept inside its attention modules) -> fp32 logits."""
    from llama_models.llama4.datatypes import TransformerInput

    return model(TransformerInput(tokens=tokens, tokens_position=start)).logits.clone()


# Non-weight keys the release carries: dropped by both loaders.
def _extras(n_layers: int, n_experts: int, moe_layers: list[int], head_dim: int) -> dict[str, torch.Tensor]:
    extra = {"rope.freqs": torch.rand(head_dim // 2)}
    for i in range(n_layers):
        extra[f"layers.{i}.attention.wqkv._extra_state"] = torch.zeros(0, dtype=torch.uint8)
        if i in moe_layers:
            extra[f"layers.{i}.feed_forward.global_gate_stats_3E"] = torch.rand(3, n_experts)
            extra[f"layers.{i}.feed_forward.running_gate_stats_3E"] = torch.rand(3, n_experts)
            extra[f"layers.{i}.feed_forward.experts.mlp._extra_state"] = torch.zeros(0, dtype=torch.uint8)
    return extra


def meta_moe_layers(params: dict) -> list[int]:
    moe = params.get("moe_args")
    if not moe:
        return []
    step = moe.get("interleave_moe_layer_step", 1)
    return [i for i in range(params["n_layers"]) if (i + 1) % step == 0]


def release_shards(params: dict, state: dict[str, torch.Tensor], n_shards: int = 2) -> list[dict[str, torch.Tensor]]:
    """Cut a Meta-model state dict (its module names: wq/wk/wv, w1/w2/w3, experts.w1 (E, D, F), router_DE ...)
    into `n_shards` model-parallel shards with the raw names and layouts of the released consolidated.NN.pth.

    Column-parallel weights (rows of q/k/v, w1/w3, embeddings, output) are cut along the output dimension,
    row-parallel ones (wo, w2) along the input dimension; each shard's wqkv is its q rows, then its k rows,
    then its v rows; a dense layer's fc1_weight is its w1 rows then its w3 rows; the routed experts are
    flattened to (E*D, F/n) and (E*F/n, D). Norms and the router are replicated."""
    n = n_shards
    moe_layers = meta_moe_layers(params)
    E = params["moe_args"]["num_experts"] if moe_layers else 0
    D = params["dim"]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]

    def put(key: str, parts):
        for s, t in zip(shards, parts):
            s[key] = t.contiguous().clone()

    put("tok_embeddings.weight", state["tok_embeddings.weight"].chunk(n, 0))
    put("output.weight", state["output.weight"].chunk(n, 0))
    put("norm.weight", [state["norm.weight"]] * n)
    for i in range(params["n_layers"]):
        p, a, f = f"layers.{i}.", f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        q, k, v = (state[a + w + ".weight"].chunk(n, 0) for w in ("wq", "wk", "wv"))
        put(a + "wqkv.weight", [torch.cat([q[s], k[s], v[s]]) for s in range(n)])
        put(a + "wo.weight", state[a + "wo.weight"].chunk(n, 1))
        put(a + "wqkv.layer_norm_weight", [state[p + "attention_norm.weight"]] * n)
        if i in moe_layers:
            put(f + "norm.weight", [state[p + "ffn_norm.weight"]] * n)
            put(f + "router_DE", [state[f + "router_DE"]] * n)
            put(f + "experts.moe_w_in_eD_F", [t.reshape(E * D, -1) for t in state[f + "experts.w1"].chunk(n, 2)])
            put(f + "experts.moe_w_swiglu_eD_F", [t.reshape(E * D, -1) for t in state[f + "experts.w3"].chunk(n, 2)])
            put(f + "experts.moe_w_out_eF_D", [t.reshape(-1, D) for t in state[f + "experts.w2"].chunk(n, 1)])
            put(f + "w_in_shared_FD.weight", state[f + "shared_expert.w1.weight"].chunk(n, 0))
            put(f + "w_swiglu_FD.weight", state[f + "shared_expert.w3.weight"].chunk(n, 0))
            put(f + "w_out_shared_DF.weight", state[f + "shared_expert.w2.weight"].chunk(n, 1))
        else:
            w1, w3 = state[f + "w1.weight"].chunk(n, 0), state[f + "w3.weight"].chunk(n, 0)
            put(f + "mlp.fc1_weight", [torch.cat([w1[s], w3[s]]) for s in range(n)])
            put(f + "mlp.fc2_weight", state[f + "w2.weight"].chunk(n, 1))
            put(f + "mlp.layer_norm_weight", [state[p + "ffn_norm.weight"]] * n)
    extras = _extras(params["n_layers"], E, moe_layers, D // params["n_heads"])
    for key, t in extras.items():
        put(key, [t] * n)
    return shards


def write_meta_release(path: Path, params: dict, state: dict[str, torch.Tensor], n_shards: int = 2,
                       extra_objects: dict | None = None) -> Path:
    """params.json + consolidated.00.pth ... (torch.save). `extra_objects` adds non-tensor entries to every
    shard (e.g. io.BytesIO `_extra_state`, as TransformerEngine writes them)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params, indent=2))
    for s, shard in enumerate(release_shards(params, state, n_shards)):
        torch.save({**shard, **(extra_objects or {})}, path / f"consolidated.{s:02d}.pth")
    return path


def load_meta_release(path: Path, params: dict, max_seq_len: int = 64, max_batch_size: int = 2):
    """Meta's way: merge the shards with `llama_models.checkpoint.maybe_reshard_state_dict`, then
    `load_state_dict` through its load hooks. Returns (model, missing keys, unexpected keys).

    maybe_reshard_state_dict sets torch's default tensor type to bf16 as a side effect: restored here."""
    from llama_models.checkpoint import maybe_reshard_state_dict

    dtype = torch.get_default_dtype()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its deprecation + prints
            warnings.simplefilter("ignore")
            merged = maybe_reshard_state_dict(sorted(Path(path).glob("consolidated.*.pth")),
                                              n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                                              moe_num_experts=(params.get("moe_args") or {}).get("num_experts"))
    finally:
        torch.set_default_dtype(dtype)
    model = build_meta(params, max_seq_len, max_batch_size)
    result = model.load_state_dict(merged, strict=False)
    return model, list(result.missing_keys), list(result.unexpected_keys)


def extra_keys(params: dict) -> set[str]:
    moe_layers = meta_moe_layers(params)
    E = params["moe_args"]["num_experts"] if moe_layers else 0
    return set(_extras(params["n_layers"], E, moe_layers, params["dim"] // params["n_heads"]))


"""Tests for checkpoint.py: clear errors on bad checkpoints, the native round trip, dtype conversion, and
streaming loads whose peak memory stays near the checkpoint's size.

The Hugging Face files are written here from the key names in llama4-facts.md (and once by transformers'
`save_pretrained`); the Meta release with `_oracles.release_shards` (also written from the facts file, and
checked against Meta's own merge by the parity tests). Each bad checkpoint differs from a good one, which is
first shown to load with the right logits, by exactly one defect.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import storage  # noqa: E402
from checkpoint import CheckpointError, hf_pieces, load_args, load_model, save_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402



# Tiny: 4 layers (3 is NoPE), MoE on odd layers, dense on even ones. Hidden sizes follow Meta's rule for dim 32,
# multiple_of 16 (facts file): dense round_up(int(2 * 4 * 32 / 3) = 85, 16) = 96; expert round_up(85 // 2, 16) = 48.
TINY = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=64, n_experts=4, top_k=1,
                 moe_hidden_dim=48, ffn_hidden_dim=96, interleave_moe_layer_step=2, use_qk_norm=True,
                 rope_scaling=None, attention_chunk_size=8, floor_scale=8.0, attn_scale=0.1, max_seq_len=128,
                 image_token_id=200092)
TINY_META_PARAMS = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, ffn_exp=4.0,
                        norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False, nope_layer_interval=4,
                        use_qk_norm=True, attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=8.0,
                        attn_scale=0.1, moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2))


def random_model(args=TINY, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
    return model.to(dtype).eval()


def logits(model, seed=5):
    tokens = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


# ------------------------------------------------------------------------------------------------------
# Writers: Hugging Face names (facts file, "Checkpoint key names") and Meta's release
# ------------------------------------------------------------------------------------------------------

def hf_state(model: Transformer) -> dict:
    s = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    a = model.args
    out = {"model.embed_tokens.weight": s["tok_embeddings.weight"], "model.norm.weight": s["norm.weight"],
           "lm_head.weight": s["output.weight"]}
    for i in range(a.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = s[o + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = s[o + "ffn_norm.weight"]
        for ours, theirs in zip("qkvo", "qkvo"):
            out[h + f"self_attn.{theirs}_proj.weight"] = s[o + f"attention.w{ours}.weight"]
        f, g = o + "feed_forward.", h + "feed_forward."
        if i in a.moe_layers:
            out[g + "router.weight"] = s[f + "router.weight"]
            out[g + "experts.gate_up_proj"] = torch.cat([s[f + "experts.w1"], s[f + "experts.w3"]], -1)  # (E, D, 2F)
            out[g + "experts.down_proj"] = s[f + "experts.w2"]
            for w, name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                out[g + f"shared_expert.{name}_proj.weight"] = s[f + f"shared_expert.{w}.weight"]
        else:
            for w, name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                out[g + f"{name}_proj.weight"] = s[f + f"{w}.weight"]
    return out


def hf_config(a: ModelArgs) -> dict:
    """A text-only config.json in the style of the Hub's (rope_theta + rope_scaling, no_rope_layers 1 = RoPE)."""
    return dict(architectures=["Llama4ForCausalLM"], model_type="llama4_text", hidden_size=a.dim,
                num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                head_dim=a.head_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps, num_local_experts=a.n_experts,
                num_experts_per_tok=a.top_k, intermediate_size=a.moe_hidden_dim, intermediate_size_mlp=a.ffn_hidden_dim,
                interleave_moe_layer_step=a.interleave_moe_layer_step, moe_layers=a.moe_layers,
                use_qk_norm=a.use_qk_norm, rope_theta=a.rope_theta, rope_scaling=None,
                no_rope_layers=[0 if i in a.nope_layers else 1 for i in range(a.n_layers)],
                attention_chunk_size=a.attention_chunk_size, attn_temperature_tuning=4, floor_scale=a.floor_scale,
                attn_scale=a.attn_scale, max_position_embeddings=a.max_seq_len, torch_dtype="float32")


def write_hf(path: Path, model: Transformer, shards: int = 1, drop=(), extra=None, replace_tensors=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(model.args)))
    state = {k: v for k, v in hf_state(model).items() if k not in drop}
    state.update(extra or {})
    state.update(replace_tensors or {})
    if shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return path
    keys = list(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def meta_state(model: Transformer) -> dict:
    """Our state dict in the names of Meta's modules (the input of _oracles.release_shards)."""
    out = {}
    for n, t in model.state_dict().items():
        if n.endswith("expert_bias"):
            continue
        if n.endswith("feed_forward.router.weight"):
            out[n.replace("router.weight", "router_DE")] = t.t().contiguous()  # (D, E)
        else:
            out[n] = t
    return out


def write_meta(path: Path, params: dict, model: Transformer, n_shards: int = 2) -> Path:
    from _oracles import write_meta_release
    return write_meta_release(path, params, meta_state(model), n_shards)


@pytest.fixture(scope="module")
def tiny():
    model = random_model()
    return model, logits(model)


def assert_error(path, *fragments, **kw):
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg  # one line
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ------------------------------------------------------------------------------------------------------
# The good checkpoints load
# ------------------------------------------------------------------------------------------------------

def test_good_hf_and_meta_checkpoints_load(tiny, tmp_path):
    model, want = tiny
    for path in (write_hf(tmp_path / "hf", model), write_hf(tmp_path / "hf2", model, shards=2),
                 write_meta(tmp_path / "meta", TINY_META_PARAMS, model)):
        loaded = load_model(path)
        assert not loaded.training
        torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)
    # the Meta config's hidden sizes come from Meta's sizing rule (worked out by hand above TINY)
    a = load_args(tmp_path / "meta")
    assert (a.ffn_hidden_dim, a.moe_hidden_dim, a.head_dim, a.moe_layers, a.nope_layers) == (96, 48, 8, [1, 3], [3])


# ------------------------------------------------------------------------------------------------------
# Bad Hugging Face checkpoints
# ------------------------------------------------------------------------------------------------------

def test_missing_tensor_in_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from _oracles import hf_text_config
    cfg = hf_text_config(dict(rope_type="default", rope_theta=10000.0), interleave_moe_layer_step=2)
    torch.manual_seed(0)
    transformers.Llama4ForCausalLM(cfg).save_pretrained(tmp_path)
    load_model(tmp_path)  # loads as saved
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    key = "model.layers.2.self_attn.k_proj.weight"
    del state[key]
    save_file(state, f, metadata={"format": "pt"})
    msg = assert_error(tmp_path, "missing")
    assert key in msg or "layers.2.attention.wk.weight" in msg, msg


@pytest.mark.parametrize("key", ["model.layers.1.feed_forward.experts.gate_up_proj", "lm_head.weight",
                                 "model.layers.0.post_attention_layernorm.weight"])
def test_missing_tensor(tiny, tmp_path, key):
    msg = assert_error(write_hf(tmp_path, tiny[0], drop=[key]), "missing")
    ours = {"model.layers.1.feed_forward.experts.gate_up_proj": "layers.1.feed_forward.experts.w1",
            "lm_head.weight": "output.weight",
            "model.layers.0.post_attention_layernorm.weight": "layers.0.ffn_norm.weight"}[key]
    assert key in msg or ours in msg, msg


@pytest.mark.parametrize("key,shape", [("model.layers.0.self_attn.q_proj.weight", (33, 32)),
                                       ("model.layers.1.feed_forward.experts.down_proj", (4, 48, 31)),
                                       ("model.embed_tokens.weight", (65, 32))])
def test_wrong_shape(tiny, tmp_path, key, shape):
    path = write_hf(tmp_path, tiny[0], replace_tensors={key: torch.zeros(shape)})
    assert_error(path, key, str(tuple(shape)))


def test_unexpected_key(tiny, tmp_path):
    key = "model.layers.0.self_attn.q_norm.weight"
    path = write_hf(tmp_path, tiny[0], extra={key: torch.ones(8)})
    assert_error(path, "unexpected", key)


@pytest.mark.parametrize("key", ["multi_modal_projector.linear_2.weight", "vision_model.bogus.weight"])
def test_unknown_vision_keys_are_unexpected_not_a_crash(key):
    assert hf_pieces(key, vision=True) == []  # load_model then names the key as unexpected
    assert hf_pieces(key, vision=False) is None  # text only: vision keys are skipped


def test_truncated_safetensors(tiny, tmp_path):
    path = write_hf(tmp_path, tiny[0])
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_error(path, "model.safetensors", "truncated")


def test_zero_byte_safetensors(tiny, tmp_path):
    path = write_hf(tmp_path, tiny[0])
    (path / "model.safetensors").write_bytes(b"")
    assert_error(path, "model.safetensors", "not a safetensors file")


def test_garbage_safetensors_header(tiny, tmp_path):
    path = write_hf(tmp_path, tiny[0])
    f = path / "model.safetensors"
    f.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 100)
    assert_error(path, "model.safetensors", "not a safetensors file")


def test_sharded_index_lists_a_missing_shard(tiny, tmp_path):
    path = write_hf(tmp_path, tiny[0], shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    assert_error(path, "model-00002-of-00002.safetensors", "missing")


def test_bad_config_json(tiny, tmp_path):
    path = write_hf(tmp_path, tiny[0])
    (path / "config.json").write_text("{ this is not json")
    assert_error(path, "config.json", "JSON")
    cfg = hf_config(TINY)
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert_error(path, "config.json", "hidden_size")


def test_unrelated_directory_lists_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    msg = assert_error(tmp_path, "config.json", "params.json", "llama4.json", "consolidated", "safetensors")
    assert "notes.txt" in msg  # and says what it found instead
    (tmp_path / "config.json").write_text("{}")  # a config without weights is still not a checkpoint
    assert_error(tmp_path, "not a Llama 4 checkpoint")


def test_nonexistent_path(tmp_path):
    assert_error(tmp_path / "nope", "nope", "no such")


def test_a_file_instead_of_a_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    assert_error(f, "model.safetensors")


# ------------------------------------------------------------------------------------------------------
# Bad Meta checkpoints: a .pth can never run code
# ------------------------------------------------------------------------------------------------------

def _ran(marker):
    Path(marker).write_text("the checkpoint ran code")
    return {}


class Payload:
    """Unpickling this calls _ran(marker): what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_ran, (str(self.marker),))


@pytest.fixture
def meta_dir(tiny, tmp_path):
    path = write_meta(tmp_path / "meta", TINY_META_PARAMS, tiny[0])
    assert sorted(p.name for p in path.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    return path


def test_meta_pth_not_a_pickle(meta_dir):
    (meta_dir / "consolidated.01.pth").write_bytes(os.urandom(4096))
    assert_error(meta_dir, "consolidated.01.pth")


def test_meta_pth_truncated(meta_dir):
    f = meta_dir / "consolidated.00.pth"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    assert_error(meta_dir, "consolidated.00.pth")


def test_meta_pth_empty(meta_dir):
    (meta_dir / "consolidated.00.pth").write_bytes(b"")
    assert_error(meta_dir, "consolidated.00.pth")


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_meta_pth_with_pickled_code_is_refused_and_never_runs(meta_dir, tmp_path, zipfile):
    marker = tmp_path / "pwned"
    f = meta_dir / "consolidated.01.pth"
    good = torch.load(f, weights_only=True)
    evil = {**good, "layers.0.attention.wo.weight": Payload(marker)}
    torch.save(evil, f, _use_new_zipfile_serialization=zipfile)
    # the payload is live: an unsafe load would run it
    probe = tmp_path / "probe.pth"
    probe.write_bytes(f.read_bytes())
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    assert_error(meta_dir, "consolidated.01.pth")
    assert not marker.exists()


def test_meta_shards_disagree(meta_dir):
    f = meta_dir / "consolidated.01.pth"
    s = torch.load(f, weights_only=True)
    del s["layers.2.feed_forward.mlp.fc2_weight"]
    torch.save(s, f)
    assert_error(meta_dir, "layers.2.feed_forward.mlp.fc2_weight")


def test_meta_missing_tensor_in_every_shard(meta_dir):
    for f in meta_dir.glob("consolidated.*.pth"):
        s = torch.load(f, weights_only=True)
        del s["layers.1.feed_forward.experts.moe_w_out_eF_D"]
        torch.save(s, f)
    msg = assert_error(meta_dir, "missing")
    assert "layers.1.feed_forward.experts.w2" in msg or "moe_w_out_eF_D" in msg


# ------------------------------------------------------------------------------------------------------
# Native round trip, overwrite, dtype
# ------------------------------------------------------------------------------------------------------

def test_native_roundtrip_identical(tiny, tmp_path):
    model = random_model(seed=1)
    with torch.no_grad():
        model.layers[1].feed_forward.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, -0.25]))
        model.layers[3].feed_forward.expert_bias.copy_(torch.tensor([-1.0, 0.0, 3.0, -2.0]))
    tok = tmp_path / "tok.model"
    tok.write_text("aGVsbG8= 0\n")
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    assert (tmp_path / "ckpt" / "tokenizer.model").read_text() == tok.read_text()
    loaded = load_model(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.layers[3].feed_forward.expert_bias.tolist() == [-1.0, 0.0, 3.0, -2.0]
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.args == model.args


def test_native_save_over_existing_replaces_it(tmp_path):
    old, new = random_model(seed=1), random_model(replace(TINY, n_layers=2), seed=2)
    path = tmp_path / "ckpt"
    save_checkpoint(old, path)
    save_checkpoint(new, path)
    loaded = load_model(path)
    assert loaded.args.n_layers == 2
    assert torch.equal(logits(loaded), logits(new))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left beside it
    assert sorted(p.name for p in path.iterdir()) == ["llama4.json", "model.safetensors"]


def test_native_save_interrupted_while_replacing_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """The docstring's promise: a crash at any moment leaves a loadable checkpoint (the old or the new one)."""
    old, new = random_model(seed=1), random_model(replace(TINY, n_layers=2), seed=2)
    path = tmp_path / "ckpt"
    save_checkpoint(old, path)
    real_replace, calls = os.replace, []

    def crash_after_first(src, dst):
        if calls:
            raise KeyboardInterrupt("power cut")
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", crash_after_first)  # storage.publish renames
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, path)
    monkeypatch.undo()
    loaded = load_model(path)  # today: new llama4.json with the old weights -> CheckpointError
    got = logits(loaded)
    assert torch.equal(got, logits(old)) or torch.equal(got, logits(new))


def test_load_fp32_as_bf16(tiny, tmp_path):
    model = random_model(seed=3)
    with torch.no_grad():
        model.layers[1].feed_forward.expert_bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    save_checkpoint(model, tmp_path / "native")
    write_hf(tmp_path / "hf", model)
    write_meta(tmp_path / "meta", TINY_META_PARAMS, model)
    for layout in ("native", "hf", "meta"):
        loaded = load_model(tmp_path / layout, dtype=torch.bfloat16)
        for n, p in loaded.named_parameters():
            assert p.dtype == torch.bfloat16, (layout, n)
            assert torch.equal(p, model.get_parameter(n).to(torch.bfloat16)), (layout, n)
        assert loaded.layers[1].feed_forward.expert_bias.dtype == torch.bfloat16
        assert logits(loaded).dtype == torch.bfloat16
    assert load_model(tmp_path / "native").layers[0].attention.wq.weight.dtype == torch.float32  # None: as stored


# ------------------------------------------------------------------------------------------------------
# Zero copy: on the CPU, tensors already in the asked dtype stay views of the (private) file mapping
# ------------------------------------------------------------------------------------------------------

def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process, from /proc/self/maps (Linux)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


def views_file(t: torch.Tensor, file: Path, maps) -> bool:
    """Whether tensor t's first byte lies in a mapping of `file` (the kernel names mapped files in /proc)."""
    return any(a <= t.data_ptr() < b and Path(name) == file.resolve() for a, b, name in maps)


linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")


@linux_only
def test_zero_copy_views_the_file_only_when_the_dtype_matches(tiny, tmp_path):
    model, want = tiny
    save_checkpoint(model, tmp_path / "native")
    write_hf(tmp_path / "hf", model)
    write_meta(tmp_path / "meta1", TINY_META_PARAMS, model, n_shards=1)
    write_meta(tmp_path / "meta2", TINY_META_PARAMS, model, n_shards=2)
    files = {"native": tmp_path / "native" / "model.safetensors", "hf": tmp_path / "hf" / "model.safetensors",
             "meta1": tmp_path / "meta1" / "consolidated.00.pth", "meta2": tmp_path / "meta2" / "consolidated.00.pth"}
    for layout, file in files.items():
        viewed = load_model(tmp_path / layout)
        copied = load_model(tmp_path / layout, zero_copy=False)
        as_bf16 = load_model(tmp_path / layout, dtype=torch.bfloat16)
        maps = mapped_files()
        on_file = {n for n, p in viewed.named_parameters() if views_file(p, file, maps)}
        if layout == "meta2":  # two shards: only the replicated tensors (norms, router) can be views
            assert on_file and all(n.endswith(("norm.weight", "router.weight")) for n in on_file), on_file
        else:  # every weight, the HF experts' w1/w3 (halves of gate_up_proj) included
            assert on_file == {n for n, _ in viewed.named_parameters()}, layout
        assert not any(views_file(p, file, maps) for p in [*copied.parameters(), *as_bf16.parameters()]), layout
        for n, p in copied.named_parameters():
            assert torch.equal(viewed.get_parameter(n), p), (layout, n)
        torch.testing.assert_close(logits(viewed), want, atol=1e-5, rtol=1e-5)
        # Meta's router is stored (D, E): its view is the transpose, which BLAS sums in another order
        torch.testing.assert_close(logits(viewed), logits(copied), atol=0 if layout in ("native", "hf") else 1e-6,
                                   rtol=0 if layout in ("native", "hf") else 1e-6)


def file_bytes(path: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted(path.iterdir()) if f.suffix in (".safetensors", ".pth")]


@pytest.mark.parametrize("layout", ["native", "hf", "meta1"])
def test_training_a_zero_copy_model_never_writes_the_file(tiny, tmp_path, layout):
    """The mapping is copy-on-write (MAP_PRIVATE): in-place updates (an AdamW step, a plain add_) change the
    model, and neither the file nor a model loaded from it later."""
    model, _ = tiny
    path = {"native": lambda: save_checkpoint(model, tmp_path) or tmp_path, "hf": lambda: write_hf(tmp_path, model),
            "meta1": lambda: write_meta(tmp_path, TINY_META_PARAMS, model, n_shards=1)}[layout]()
    before = file_bytes(path)
    loaded = load_model(path).train()
    original = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    opt = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    loaded(tokens[:, :-1]).flatten(0, 1).log_softmax(-1).gather(1, tokens[:, 1:].reshape(-1, 1)).mean().neg().backward()
    opt.step()
    with torch.no_grad():
        loaded.norm.weight.add_(1.0)
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, original[n])]
    assert len(changed) == len(original)  # AdamW moved every weight
    assert file_bytes(path) == before
    for n, p in load_model(path).named_parameters():
        assert torch.equal(p, original[n]), n


def test_saving_over_the_file_a_model_views_leaves_that_model_unchanged(tmp_path):
    """save_checkpoint replaces the weights file by a rename: a model still viewing the old file keeps its
    weights, a fresh load sees the new ones. Saving a zero-copy model over its own source works too."""
    old, new = random_model(seed=1), random_model(seed=2)
    path = tmp_path / "ckpt"
    save_checkpoint(old, path)
    loaded = load_model(path)
    save_checkpoint(new, path)
    assert torch.equal(logits(loaded), logits(old))
    assert torch.equal(logits(load_model(path)), logits(new))
    with torch.no_grad():  # update the model that views `path` in place, then save it over `path`
        loaded.output.weight.mul_(2.0)
    save_checkpoint(loaded, path)
    for n, p in load_model(path).named_parameters():
        want = old.get_parameter(n) * (2.0 if n == "output.weight" else 1.0)
        assert torch.equal(p, want), n


@linux_only
def test_for_decode_loads_a_model_prepared_for_the_cpu(tiny, tmp_path):
    """for_decode: the loaded model, fused and packed (cpu_decode.prepare_for_decode): the same logits within
    fp32 rounding; what stays a parameter (a view of the file) is the embedding table, norms and routers."""
    from cpu_decode import packed_weights

    model, want = tiny
    write_hf(tmp_path, model)
    file = tmp_path / "model.safetensors"
    loaded = load_model(tmp_path, for_decode=True)
    assert loaded.prepared_for_decode and loaded.layers[0].attention.wq is None
    # 4 layers x (wqkv, wo); 2 dense layers x (w13, w2); 2 MoE layers x (shared w13, w2, 4 experts x (w13, w2));
    # the output head: 8 + 4 + 20 + 1
    assert len(packed_weights(loaded)) == 33
    maps = mapped_files()
    left = [n for n, p in loaded.named_parameters()]
    assert all(n == "tok_embeddings.weight" or n.endswith(("norm.weight", "router.weight")) for n in left)
    assert len(left) == 1 + 2 * 4 + 1 + 2
    assert all(views_file(p, file, maps) for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)


@linux_only
def test_the_mapping_lives_exactly_as_long_as_the_model(tmp_path):
    import gc

    save_checkpoint(random_model(seed=1), tmp_path)
    file = (tmp_path / "model.safetensors").resolve()
    loaded = load_model(tmp_path)
    gc.collect()  # nothing but the model's tensors refers to the mapping now
    assert any(Path(name) == file for _, _, name in mapped_files())
    assert torch.equal(logits(loaded), logits(random_model(seed=1)))  # still readable
    w = loaded.output.weight
    del loaded
    gc.collect()
    assert any(Path(name) == file for _, _, name in mapped_files())  # one tensor keeps it alive
    assert torch.equal(w, random_model(seed=1).output.weight)
    del w
    gc.collect()
    assert not any(Path(name) == file for _, _, name in mapped_files())  # then it is unmapped


# ------------------------------------------------------------------------------------------------------
# Streaming: loading needs about one copy of the weights
# ------------------------------------------------------------------------------------------------------

# ~286 MB of fp32 weights, no single tensor above 12% of them (like the real checkpoints: Scout's largest
# tensor, one layer's experts, is 0.6% of it). Meta sizes by hand: dense round_up(int(8 * 256 / 3), 256) = 768,
# experts round_up(682 // 2, 256) = 512.
BIG = ModelArgs(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=32768, n_experts=16,
                top_k=1, moe_hidden_dim=512, ffn_hidden_dim=768, interleave_moe_layer_step=1, use_qk_norm=True,
                rope_scaling=None, attention_chunk_size=8192, floor_scale=8192.0, max_seq_len=8192)
BIG_META_PARAMS = dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32768, multiple_of=256, ffn_exp=4.0,
                       norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False, nope_layer_interval=4,
                       use_qk_norm=True, attention_chunk_size=8192, attn_temperature_tuning=True,
                       floor_scale=8192.0, attn_scale=0.1, max_seq_len=8192,
                       moe_args=dict(num_experts=16, top_k=1, interleave_moe_layer_step=1))

MEASURE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from checkpoint import load_model

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

# Warm up what the first meta-device module and the first copy set up once (torch's meta-tensor machinery is
# imported lazily: ~65 MB, whatever the checkpoint's size), so that only the loading itself is measured.
with torch.device("meta"):
    torch.nn.Embedding(3, 2), torch.nn.Linear(2, 2)
torch.empty(4).copy_(torch.ones(4))
before = rss()
try:  # reset the high-water mark to the current RSS (Linux), so imports do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
model = load_model(sys.argv[2], zero_copy=sys.argv[3] != "copy", for_decode=sys.argv[3] == "for_decode")
from cpu_decode import packed_weights
plain = [*model.parameters(), *model.buffers()]  # (a model prepared for decoding refuses state_dict)
n = sum(t.numel() * t.element_size() for t in plain + packed_weights(model))
with torch.no_grad():  # read every weight once: a zero-copy load maps the pages in only now
    sum(float(t.float().sum()) for t in plain)
print(json.dumps(dict(before=before, hwm=hwm() if reset else None, reset=reset,
                      ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, model_bytes=n)))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(BIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    root = tmp_path_factory.mktemp("big")
    write_hf(root / "hf", model)
    write_meta(root / "meta", BIG_META_PARAMS, model)
    a = load_args(root / "meta")
    assert (a.ffn_hidden_dim, a.moe_hidden_dim) == (768, 512)
    del model
    return root


def peak_increase(path: Path, how: str) -> tuple[float, dict]:
    r = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), str(path), how], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    peak = m["hwm"] if m["reset"] else m["ru_maxrss"]
    return peak - m["before"], m


@pytest.mark.parametrize("layout,how", [("hf", "copy"), ("hf", "zero_copy"), ("hf", "for_decode"), ("meta", "for_decode"),
                                        ("meta", "copy"), ("meta", "zero_copy")])
def test_streaming_load_peak_memory(big, layout, how):
    path = big / layout
    files = list(path.glob("*.safetensors")) + list(path.glob("*.pth"))
    ckpt_bytes = sum(f.stat().st_size for f in files)
    increase, m = peak_increase(path, how)
    ratio = increase / ckpt_bytes
    print(f"{layout}, {how}: checkpoint {ckpt_bytes / 1e6:.1f} MB, model {m['model_bytes'] / 1e6:.1f} MB, "
          f"peak RSS increase {increase / 1e6:.1f} MB = {ratio:.3f} x checkpoint")
    assert m["model_bytes"] >= 0.95 * ckpt_bytes  # the weights really are (almost all of) the files
    assert ratio <= 1.3, f"{layout}: loading peaked at {ratio:.2f} x the checkpoint's bytes"

"""Parity with Hugging Face transformers (5.23) `Llama4ForCausalLM` / `Llama4ForConditionalGeneration`.

Tiny random fp32 models are saved with `save_pretrained` and read back with `checkpoint.load_model`; our logits
must match theirs within 1e-4 and every MoE layer must send every token to the same expert (ours:
`MoE.last_expert_ids`; theirs: the argmax of the router logits from `output_router_logits=True`).

The configurations switch every Llama 4 feature on at a size where it matters: attention chunks of 8 with
40 tokens (5 chunks), temperature tuning from position 3 (floor_scale 4), llama3 RoPE scaling with an
original context of 32 (so most of the 8 frequencies are rescaled), and 4 layers (layer 3 is NoPE).
`test_the_setup_exercises_every_feature` checks that switching each feature off in the oracle moves its
logits far beyond the tolerance, so these tests can fail.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _oracles import hf_text_config, hub_style, max_diff, randomize_  # noqa: E402

import checkpoint  # noqa: E402
from moe import MoE  # noqa: E402
from rope import rope_frequencies  # noqa: E402

TOL = 1e-4
T = 40  # 5 attention chunks of 8

FLAVORS = {
    # Scout-like: MoE on every layer, QK-norm, llama3 scaling as in Meta's code (16 / 1 / 1: a hard step).
    "scout": dict(interleave_moe_layer_step=1, use_qk_norm=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=16.0, low_freq_factor=1.0,
                                       high_freq_factor=1.0, original_max_position_embeddings=32)),
    # Scout base-style scaling 8 / 1 / 4: with theta 1e4 and head_dim 16 the wavelengths are 6.3 (kept),
    # 19.9 (in the smooth band between 32/4 and 32/1) and 63 .. 19869 (divided by 8).
    "scout_base": dict(interleave_moe_layer_step=1, use_qk_norm=True,
                       rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=32)),
    # Maverick-like: MoE on odd layers, dense SwiGLU between, no QK-norm, no scaling; and a head_dim that is
    # not hidden_size / heads, to check it is read rather than derived.
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, head_dim=24,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}
SEEDS = {"scout": 1, "scout_base": 2, "maverick": 3}


def make_hf(flavor: str):
    cfg = hf_text_config(**FLAVORS[flavor], attn_implementation="eager")
    return randomize_(transformers.Llama4ForCausalLM(cfg), SEEDS[flavor]).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """flavor -> (HF model, directory it was saved to), built once per module."""
    cache = {}

    def get(flavor):
        if flavor not in cache:
            model = make_hf(flavor)
            path = tmp_path_factory.mktemp(f"hf-{flavor}")
            model.save_pretrained(path)
            cache[flavor] = (model, path)
        return cache[flavor]

    return get


def tokens(seed: int, n: int = T, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_run(hf, ids):
    """HF logits (B, T, V) and the expert chosen per token in each MoE layer [(B*T,), ...]."""
    out = hf(input_ids=ids, output_router_logits=True)
    return out.logits, [r.argmax(-1) for r in out.router_logits]


@torch.no_grad()
def our_run(model, ids, **kw):
    logits = model(ids, **kw)
    return logits, [l.feed_forward.last_expert_ids[:, 0] for l in model.layers if isinstance(l.feed_forward, MoE)]


def assert_same(ours, theirs, what=""):
    (lo, eo), (lt, et) = ours, theirs
    assert lo.shape == lt.shape
    d = max_diff(lo, lt)
    assert d <= TOL, f"{what}: max |logits ours - HF| = {d:.2e}"
    assert len(eo) == len(et) and len(eo) > 0
    for i, (a, b) in enumerate(zip(eo, et)):
        assert torch.equal(a, b), f"{what}: MoE layer #{i} routes {int((a != b).sum())} tokens differently"


# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_logits_and_routing_match(saved, flavor):
    hf, path = saved(flavor)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in cfg and "layer_types" in cfg  # the transformers-5 style
    ours = checkpoint.load_model(path)
    ids = tokens(10)
    assert_same(our_run(ours, ids), hf_run(hf, ids), flavor)


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_config_numbers_match_hf(saved, flavor):
    """What we read from config.json is what HF built: layer schedules, chunking, tuning, RoPE frequencies."""
    hf, path = saved(flavor)
    args = checkpoint.load_args(path)
    c = hf.config
    assert args.nope_layers == [i for i, r in enumerate(c.no_rope_layers) if not r] == [3]
    assert args.moe_layers == list(c.moe_layers) == ([1, 3] if flavor == "maverick" else [0, 1, 2, 3])
    assert (args.dim, args.head_dim, args.n_heads, args.n_kv_heads) == (c.hidden_size, c.head_dim,
                                                                        c.num_attention_heads, c.num_key_value_heads)
    assert (args.moe_hidden_dim, args.ffn_hidden_dim) == (c.intermediate_size, c.intermediate_size_mlp)
    assert args.use_qk_norm is (flavor != "maverick")
    assert args.attention_chunk_size == 8 and args.attn_temperature_tuning is True
    assert (args.floor_scale, args.attn_scale) == (4.0, 0.1)
    theirs = hf.model.rotary_emb.inv_freq
    mine = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    assert torch.allclose(mine, theirs, rtol=1e-6, atol=0), (mine, theirs)


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_hub_style_config_reads_the_same(saved, tmp_path, flavor):
    """The configs published on the Hub use `rope_theta` + `rope_scaling`, the 0/1 list `no_rope_layers`
    (no `layer_types`) and `attn_temperature_tuning: 4`: the same numbers must come out, and the same logits."""
    hf, path = saved(flavor)
    hub = tmp_path / "hub"
    shutil.copytree(path, hub)
    cfg = hub_style(json.loads((path / "config.json").read_text()))
    assert cfg["attn_temperature_tuning"] == 4 and "rope_parameters" not in cfg and "layer_types" not in cfg
    if flavor == "maverick":
        assert cfg["rope_scaling"] is None
    else:
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["original_max_position_embeddings"] == 32
    (hub / "config.json").write_text(json.dumps(cfg, indent=2))
    assert checkpoint.load_args(hub) == checkpoint.load_args(path)
    ids = tokens(11)
    assert_same(our_run(checkpoint.load_model(hub), ids), hf_run(hf, ids), f"{flavor} (Hub-style config)")


@torch.no_grad()
def test_the_setup_exercises_every_feature(saved):
    """Switch each feature off in the oracle: its logits must move by far more than TOL, or the parity tests
    above could not notice that feature being wrong in our code."""
    hf, _ = saved("scout")
    ids = tokens(10)
    ref = hf(input_ids=ids).logits
    moved = {}
    nope = hf.model.layers[3].self_attn
    nope.attn_temperature_tuning = False
    moved["temperature tuning"] = max_diff(hf(input_ids=ids).logits, ref)
    nope.attn_temperature_tuning = True
    hf.config.attention_chunk_size = 4096
    moved["attention chunks"] = max_diff(hf(input_ids=ids).logits, ref)
    hf.config.attention_chunk_size = 8
    rot = hf.model.rotary_emb
    scaled = rot.inv_freq.clone()
    rot.inv_freq.copy_(rope_frequencies(16, 10000.0))
    moved["rope scaling"] = max_diff(hf(input_ids=ids).logits, ref)
    rot.inv_freq.copy_(scaled)
    base, _ = saved("scout_base")  # the smooth band: frequency 1 interpolated vs. left alone
    base_ref = base(input_ids=ids).logits
    rot = base.model.rotary_emb
    scaled = rot.inv_freq.clone()
    rot.inv_freq[1] = rope_frequencies(16, 10000.0)[1]
    moved["smooth band"] = max_diff(base(input_ids=ids).logits, base_ref)
    rot.inv_freq.copy_(scaled)
    assert max_diff(hf(input_ids=ids).logits, ref) == 0  # everything restored
    for what, d in moved.items():
        assert d > 100 * TOL, f"{what} changes the logits by only {d:.2e}"


def test_conditional_generation_text_only(tmp_path):
    """A multimodal checkpoint: the text-only load skips the vision tower and projector and gives HF's text
    logits on input_ids alone."""
    text = hf_text_config(**FLAVORS["scout"]).to_dict()
    vision = transformers.Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, image_size=56, patch_size=14, vision_output_dim=64,
                                             projector_input_dim=64, projector_output_dim=64)
    cfg = transformers.Llama4Config(text_config=text, vision_config=vision, image_token_index=100)
    cfg.text_config._attn_implementation = "eager"
    hf = randomize_(transformers.Llama4ForConditionalGeneration(cfg), 4).eval()
    hf.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_model.") for k in keys)
    assert any(k.startswith("multi_modal_projector.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    ours = checkpoint.load_model(tmp_path)
    assert ours.vision is None and ours.args.image_token_id == hf.config.image_token_id == 100
    ids = tokens(12)
    assert_same(our_run(ours, ids), hf_run(hf, ids), "ForConditionalGeneration, text only")
    # The Hub's Scout repos are this kind of checkpoint, with their text_config in the Hub style.
    hub = tmp_path / "hub"
    shutil.copytree(tmp_path, hub, ignore=shutil.ignore_patterns("hub"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"] = hub_style(cfg["text_config"])
    (hub / "config.json").write_text(json.dumps(cfg, indent=2))
    assert checkpoint.load_args(hub) == checkpoint.load_args(tmp_path)
    assert_same(our_run(checkpoint.load_model(hub), ids), hf_run(hf, ids), "ForConditionalGeneration, Hub style")


def test_sharded_checkpoint(tmp_path):
    hf = make_hf("maverick")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    ids = tokens(13)
    assert_same(our_run(checkpoint.load_model(tmp_path), ids), hf_run(hf, ids), "sharded")


@pytest.mark.parametrize("flavor", ["scout", "maverick"])
@torch.no_grad()
def test_cached_decode_matches_full_forward(saved, flavor):
    """Prefill 5 tokens, then 7 at once (across the chunk boundary at 8), then one at a time through the
    boundaries at 16, 24 and 32: every step's logits equal HF's full forward at those positions."""
    hf, path = saved(flavor)
    ours = checkpoint.load_model(path)
    ids = tokens(14)
    ref = hf(input_ids=ids).logits
    cache = ours.make_cache(1, T)
    steps = [(0, 5), (5, 12)] + [(p, p + 1) for p in range(12, T)]
    got = torch.cat([ours(ids[:, a:b], cache=cache) for a, b in steps], 1)
    d = max_diff(got, ref)
    assert d <= TOL, f"cached decode vs HF full forward: {d:.2e}"
    assert cache.next_pos.tolist() == [T]


@pytest.mark.parametrize("flavor", ["scout", "maverick"])
@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(saved, flavor):
    """Rows of 40, 27 and 13 tokens, left-padded to 40 (positions -1 on the pads): the padded batch, and a
    cached decode of 6 more tokens after it, give each row what HF gives that row alone."""
    hf, path = saved(flavor)
    ours = checkpoint.load_model(path)
    lengths, extra = [40, 27, 13], 6
    rows = [tokens(20 + r, n) for r, n in enumerate(lengths)]
    more = tokens(30, extra, batch=len(lengths))
    batch = torch.zeros(len(lengths), T, dtype=torch.long)
    pos = torch.full((len(lengths), T), -1)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        batch[r, T - n:] = row[0]
        pos[r, T - n:] = torch.arange(n)
    full = ours(batch, positions=pos)
    cache = ours.make_cache(len(lengths), T + extra)
    prefill = ours(batch, cache=cache, positions=pos)
    steps = [ours(more[:, j:j + 1], cache=cache) for j in range(extra)]
    assert cache.next_pos.tolist() == [n + extra for n in lengths]
    for r, n in enumerate(lengths):
        ref = hf(input_ids=torch.cat([rows[r], more[r:r + 1]], 1)).logits[0]  # (n + extra, V)
        assert max_diff(full[r, T - n:], ref[:n]) <= TOL, f"row {r} in the padded batch"
        assert max_diff(prefill[r, T - n:], ref[:n]) <= TOL, f"row {r}, padded prefill into a cache"
        got = torch.cat([s[r] for s in steps])
        assert max_diff(got, ref[n:]) <= TOL, f"row {r}, cached decode after a padded prefill"

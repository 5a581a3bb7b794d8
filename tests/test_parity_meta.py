"""Parity with Meta's reference implementation (`llama_models.llama4.model.Transformer`, llama-models 0.3.0).

Meta's model runs on CPU in a one-process model-parallel group (conftest.py `meta_group`). Tiny random
weights are written in the raw layout of Meta's release -- two model-parallel shards `consolidated.00.pth`,
`consolidated.01.pth` with fused `wqkv` / `fc1_weight`, flattened experts, `router_DE`, and the release's
non-weight keys -- plus `params.json` (tests/_oracles.py). Meta's own shard merge (`maybe_reshard_state_dict`)
and load hooks read them into its model; `checkpoint.load_model` reads them into ours; fp32 logits must agree
within 1e-4 and every token must go to the same expert.

Meta's prefill is only right within one attention chunk if it continues a cache, and its one-token decode
ignores chunks altogether: `test_meta_decode_ignores_chunks` shows where, against our full forward.
"""
import codecs
import io

import pytest
import torch

pytest.importorskip("fairscale")
pytest.importorskip("llama_models")

from _oracles import (build_meta, extra_keys, load_meta_release, max_diff, meta_forward,  # noqa: E402
                      randomize_, write_meta_release)

import checkpoint  # noqa: E402
from moe import MoE  # noqa: E402
from rope import rope_frequencies  # noqa: E402

pytestmark = pytest.mark.usefixtures("meta_group")

TOL = 1e-4
T = 24  # < the chunk of 32: one prefill of Meta's is right for all positions

BASE = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, ffn_dim_multiplier=1.2,
            ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, nope_layer_interval=4, attn_temperature_tuning=True,
            floor_scale=4.0, attn_scale=0.1, attention_chunk_size=32)
FLAVORS = {
    # MoE on every layer, QK-norm, scaled RoPE with Meta's defaults (factor 16, high-frequency factor 1)
    "scout": dict(BASE, use_qk_norm=True, use_scaled_rope=True,
                  moe_args=dict(num_experts=4, capacity_factor=1.0, auto_scale_F=True, top_k=1,
                                interleave_moe_layer_step=1)),
    # the same with factor 8 / high 4 given in params.json: wavelength 4443 lies in the smooth band
    "scout_8_4": dict(BASE, use_qk_norm=True, use_scaled_rope=True, rope_scaling_factor=8.0, rope_high_freq_factor=4.0,
                      moe_args=dict(num_experts=4, interleave_moe_layer_step=1)),
    # MoE on odd layers with dense SwiGLUs between, no QK-norm, plain RoPE
    "maverick": dict(BASE, use_qk_norm=False, use_scaled_rope=False,
                     moe_args=dict(num_experts=4, interleave_moe_layer_step=2)),
}
SEEDS = {"scout": 11, "scout_8_4": 12, "maverick": 13}


def release(tmp_path_factory, params: dict, seed: int, name: str):
    """Random Meta weights -> raw 2-shard release on disk -> Meta's model loaded from it (its way)."""
    truth = randomize_(build_meta(params), seed)
    path = write_meta_release(tmp_path_factory.mktemp(name), params, truth.state_dict())
    meta, missing, unexpected = load_meta_release(path, params)
    assert torch.get_default_dtype() == torch.float32
    assert missing == [], f"Meta's loader left {missing} unset: the shard writer is wrong"
    assert set(unexpected) <= extra_keys(params), sorted(set(unexpected) - extra_keys(params))
    for k, v in meta.state_dict().items():  # Meta's merge gives back exactly what was cut into shards
        assert torch.equal(v, truth.state_dict()[k]), k
    return meta, path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(flavor):
        if flavor not in cache:
            cache[flavor] = release(tmp_path_factory, FLAVORS[flavor], SEEDS[flavor], flavor)
        return cache[flavor]

    return get


def tokens(seed: int, n: int = T) -> torch.Tensor:
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def meta_run(meta, ids, start=0):
    """Meta's logits, and the expert each token is routed to in each MoE layer (top-1 of x @ router_DE)."""
    chosen, hooks = [], []
    for layer in meta.layers:
        if hasattr(layer.feed_forward, "router_DE"):
            hooks.append(layer.feed_forward.register_forward_pre_hook(
                lambda m, inp: chosen.append((inp[0].reshape(-1, m.router_DE.shape[0]) @ m.router_DE).argmax(-1))))
    try:
        return meta_forward(meta, ids, start), chosen
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def our_run(model, ids, **kw):
    logits = model(ids, **kw)
    return logits, [l.feed_forward.last_expert_ids[:, 0] for l in model.layers if isinstance(l.feed_forward, MoE)]


# --------------------------------------------------------------------------------------------------------

def test_release_layout_is_raw(saved):
    """The files hold Meta's raw names and per-shard slices, not the merged model's."""
    _, path = saved("scout")
    shards = [torch.load(path / f"consolidated.0{s}.pth", weights_only=True) for s in range(2)]
    s0 = shards[0]
    assert "layers.0.attention.wqkv.weight" in s0 and "layers.0.attention.wq.weight" not in s0
    assert s0["layers.0.attention.wqkv.weight"].shape == ((4 + 2 + 2) * 16 // 2, 64)  # (q + k + v rows) / 2
    assert s0["layers.0.feed_forward.experts.moe_w_in_eD_F"].shape == (4 * 64, 128 // 2)
    assert s0["layers.0.feed_forward.experts.moe_w_out_eF_D"].shape == (4 * 128 // 2, 64)
    assert s0["layers.0.feed_forward.router_DE"].shape == (64, 4)
    assert s0["tok_embeddings.weight"].shape == (96 // 2, 64)
    assert {"rope.freqs", "layers.0.feed_forward.global_gate_stats_3E", "layers.0.attention.wqkv._extra_state"} <= set(s0)
    _, mpath = saved("maverick")
    m0 = torch.load(mpath / "consolidated.00.pth", weights_only=True)
    assert m0["layers.0.feed_forward.mlp.fc1_weight"].shape == (2 * 224 // 2, 64)  # w1 rows then w3 rows
    assert "layers.0.feed_forward.mlp.layer_norm_weight" in m0 and "layers.1.feed_forward.norm.weight" in m0


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_logits_and_routing_match(saved, flavor):
    meta, path = saved(flavor)
    ours = checkpoint.load_model(path)
    ids = tokens(1)
    (lm, em), (lo, eo) = meta_run(meta, ids), our_run(ours, ids)
    d = max_diff(lo, lm)
    assert d <= TOL, f"{flavor}: max |logits ours - Meta| = {d:.2e}"
    assert len(em) == len(eo) == (2 if flavor == "maverick" else 4)
    for i, (a, b) in enumerate(zip(eo, em)):
        assert torch.equal(a, b), f"{flavor}: MoE layer #{i} routes {int((a != b).sum())} tokens differently"


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_config_numbers_match_meta(saved, flavor):
    """params.json read the way Meta's model is built: widths, layer kinds, RoPE frequencies."""
    meta, path = saved(flavor)
    args = checkpoint.load_args(path)
    assert args.head_dim == meta.layers[0].attention.head_dim == 16
    assert args.nope_layers == [i for i, l in enumerate(meta.layers) if l.is_nope_layer] == [3]
    moe = [i for i, l in enumerate(meta.layers) if hasattr(l.feed_forward, "router_DE")]
    assert args.moe_layers == moe
    assert args.moe_hidden_dim == meta.layers[moe[0]].feed_forward.experts.w1.shape[-1]
    dense = [l for l in meta.layers if not hasattr(l.feed_forward, "router_DE")]
    if dense:
        assert args.ffn_hidden_dim == dense[0].feed_forward.w1.weight.shape[0]
    assert args.use_qk_norm is meta.layers[0].attention.use_qk_norm
    theirs = meta.freqs_cis[1].angle()  # position 1: the angle is the frequency itself
    assert torch.allclose(rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling), theirs, rtol=1e-5, atol=0)


def test_rope_scaling_matters_here(saved):
    """The prefill is short, but Meta's scaled frequencies still move its logits far beyond TOL: a wrong
    reading of use_scaled_rope / rope_scaling_factor would fail test_logits_and_routing_match."""
    meta, _ = saved("scout")
    ids = tokens(1)
    scaled = meta_forward(meta, ids)
    keep = meta.freqs_cis
    angles = torch.outer(torch.arange(keep.shape[0], dtype=torch.float32), rope_frequencies(16, 500000.0))
    meta.freqs_cis = torch.polar(torch.ones_like(angles), angles)
    try:
        d = max_diff(meta_forward(meta, ids), scaled)
    finally:
        meta.freqs_cis = keep
    assert d > 10 * TOL, d


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory):
    return release(tmp_path_factory, dict(FLAVORS["scout"], attention_chunk_size=8), 14, "chunk8")


@torch.no_grad()
def test_meta_decode_ignores_chunks(small_chunks):
    """Chunk 8, 20 tokens. Meta's full prefill masks the chunks and equals our full forward. Its cached
    decode (one token at a time, no mask) lets RoPE layers see every earlier chunk: it agrees with us before
    position 8 and differs after. Our cached decode equals our full forward at every position."""
    meta, path = small_chunks
    ours = checkpoint.load_model(path)
    n, prefill = 20, 5
    ids = tokens(2, n)
    full = ours(ids)
    assert max_diff(meta_forward(meta, ids), full) <= TOL, "Meta's chunk-masked prefill"

    meta_steps = [meta_forward(meta, ids[:, :prefill])]
    meta_steps += [meta_forward(meta, ids[:, p:p + 1], start=p) for p in range(prefill, n)]
    meta_dec = torch.cat(meta_steps, 1)
    cache = ours.make_cache(1, n)
    our_dec = torch.cat([ours(ids[:, :prefill], cache=cache)] + [ours(ids[:, p:p + 1], cache=cache)
                                                                  for p in range(prefill, n)], 1)
    assert max_diff(our_dec, full) <= TOL, "our cached decode vs our full forward"
    assert max_diff(meta_dec[:, :8], full[:, :8]) <= TOL, "Meta's decode inside the first chunk"
    per_position = (meta_dec - full).abs().amax(-1)[0]  # (n,)
    assert (per_position[8:] > 100 * TOL).all(), per_position.tolist()


@pytest.mark.parametrize("ffn_exp", [4.0, 2.5])  # Meta computes int(ffn_exp * dim): no int(ffn_exp) first
def test_expert_width_rule_matches_meta(ffn_exp):
    """params.json has no hidden sizes: both widths come from Meta's sizing rule."""
    params = dict(FLAVORS["maverick"], dim=96, multiple_of=8, ffn_exp=ffn_exp)
    meta = build_meta(params)
    args = checkpoint.args_from_meta(params)
    assert args.ffn_hidden_dim == meta.layers[0].feed_forward.w1.weight.shape[0]
    assert args.moe_hidden_dim == meta.layers[1].feed_forward.experts.w1.shape[-1]


def test_extra_state_as_bytesio_loads(tmp_path):
    """The release's `*._extra_state` entries are pickled io.BytesIO objects (Meta's loader calls
    torch.serialization.add_safe_globals([io.BytesIO, codecs.encode]) before reading the shards). They are
    not weights: the load must skip them, and still refuse anything else that wants code."""
    params = FLAVORS["maverick"]
    truth = randomize_(build_meta(params), 15)
    state = truth.state_dict()
    blobs = {f"layers.{i}.attention.wqkv._extra_state": io.BytesIO(b"\x00fp8 meta\xff") for i in range(4)}
    path = write_meta_release(tmp_path, params, state, extra_objects=blobs)
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # as in a fresh process (importing Meta's generation.py adds them)
    try:
        with torch.serialization.safe_globals([io.BytesIO, codecs.encode]):  # what Meta's loader allows
            assert isinstance(torch.load(path / "consolidated.00.pth", weights_only=True)[next(iter(blobs))],
                              io.BytesIO)
        ours = checkpoint.load_model(path)
    finally:
        torch.serialization.add_safe_globals(allowed)
    ids = tokens(3)
    assert max_diff(our_run(ours, ids)[0], meta_forward(truth, ids)) <= TOL

    ran = []  # a shard whose pickle would call a function when unpickled: refused, and nothing ran

    class Payload:
        def __reduce__(self):
            return (ran.append, ("code ran",))

    write_meta_release(tmp_path, params, state, extra_objects={"layers.0.attention.wo._extra_state": Payload()})
    with pytest.raises(checkpoint.CheckpointError, match="consolidated.00.pth"):
        checkpoint.load_model(tmp_path)
    assert ran == []

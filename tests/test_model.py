"""Tests for model.py against independent references.

- Parameter counts of Scout and Maverick vs the published meta-device counts (llama4-facts.md) and vs the
  counts worked out by hand from the published sizes.
- The chunked attention mask vs a double loop; attention temperature vs the formula in Python `math`.
- A whole forward pass vs a brute-force forward written here (hand RMSNorm, per-pair rotation, masks from
  loops, every-expert MoE), on a debug-like config with chunk 8 so that 40 tokens cross 4 chunk boundaries.
- Cached decoding (prefill of any length, prefill in pieces, token by token) equals the full forward; the
  cache of a RoPE layer holds one chunk; left-padded batches equal each row alone.
- Early fusion replaces exactly the <|patch|> embeddings; RMSNorm and the dense SwiGLU in bf16.
"""
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import (FLAVORS, ModelArgs, RMSNorm, Transformer, attention_mask, causal_in_chunks,  # noqa: E402
                   param_counts, temperature)
from moe import FeedForward, MoE  # noqa: E402



# ------------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------------

# Published, counted by transformers on the meta device (llama4-facts.md), in billions, 3 decimals.
PUBLISHED = {"scout": dict(total=108.642, text=107.770, active=17.173),
             "maverick": dict(total=401.584, text=401.584 - 0.872, active=17.185)}
VISION_PUBLISHED = 0.872


def text_count_by_hand(flavor):
    """Embeddings + output + final norm + per layer (attention + 2 norms + dense or MoE feed-forward)."""
    V, D, L, H, Hkv, hd = 202048, 5120, 48, 40, 8, 128
    E = {"scout": 16, "maverick": 128}[flavor]
    moe_layers = range(48) if flavor == "scout" else range(1, 48, 2)
    Fe, Fd = 8192, 16384
    attention = D * H * hd + 2 * D * Hkv * hd + H * hd * D
    moe = E * D + 3 * E * D * Fe + 3 * D * Fe  # router, routed experts, shared expert
    dense = 3 * D * Fd
    total = 2 * V * D + D + L * (attention + 2 * D)
    total += sum(moe if i in moe_layers else dense for i in range(L))
    active = total - len(moe_layers) * (E - 1) * 3 * D * Fe  # one routed expert per MoE layer
    return total, active


def vision_count_by_hand():
    """Published vision sizes: 1408 wide, 34 layers, MLP 5632, 577 positions, adapter 5632->4096->4096,
    projector 4096->5120; patch embedding without bias, attention and MLP with biases, LayerNorms w + b."""
    d, L = 1408, 34
    layer = 4 * (d * d + d) + (d * 5632 + 5632) + (5632 * d + d) + 2 * 2 * d
    return d * 3 * 14 * 14 + d + 577 * d + 2 * 2 * d + L * layer + 5632 * 4096 + 4096 * 4096 + 4096 * 5120


@pytest.mark.parametrize("flavor", ["scout", "maverick"])
def test_text_param_counts_match_published_and_hand_count(flavor):
    with torch.device("meta"):
        model = Transformer(FLAVORS[flavor])
    c = param_counts(model)
    total, active = text_count_by_hand(flavor)
    assert c["text"] == total and c["total"] == total and c["vision"] == 0
    assert c["active"] == active
    assert round(c["text"] / 1e9, 3) == pytest.approx(PUBLISHED[flavor]["text"], abs=1e-9)
    assert round(c["active"] / 1e9, 3) == pytest.approx(PUBLISHED[flavor]["active"], abs=1e-9)


@pytest.mark.parametrize("flavor", ["scout", "maverick"])
def test_total_param_counts_with_vision_match_published(flavor):
    vision = pytest.importorskip("vision")
    with torch.device("meta"):
        model = Transformer(replace(FLAVORS[flavor], vision=vision.VisionArgs()))  # defaults = Llama 4 sizes
    c = param_counts(model)
    assert c["vision"] == vision_count_by_hand()
    assert round(c["vision"] / 1e9, 3) == VISION_PUBLISHED
    assert round(c["total"] / 1e9, 3) == pytest.approx(PUBLISHED[flavor]["total"], abs=1e-9)
    assert c["active"] == text_count_by_hand(flavor)[1]  # active counts the text model only


def _cli(*flags):
    r = subprocess.run([sys.executable, "model.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_cli_text_only_prints_published_counts():
    out = _cli("--flavor", "scout", "--text-only")
    assert "107.770 B" in out and "17.173 B" in out


def test_cli_with_vision_prints_published_total():
    out = _cli("--flavor", "maverick")
    assert "401.584 B" in out and "0.872 B" in out and "17.185 B" in out


# ------------------------------------------------------------------------------------------------------
# Mask and temperature
# ------------------------------------------------------------------------------------------------------

def mask_by_loops(q_pos, k_pos, chunk):
    B, T = q_pos.shape
    S = k_pos.shape[1]
    m = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            q = int(q_pos[b, i])
            for j in range(S):
                k = int(k_pos[b, j])
                if q < 0:  # padding query: anything (its output is thrown away), never an empty row
                    m[b, 0, i, j] = True
                elif 0 <= k <= q and (chunk is None or k // chunk == q // chunk):
                    m[b, 0, i, j] = True
    return m


@pytest.mark.parametrize("chunk", [None, 1, 4, 8, 5])
def test_attention_mask_matches_double_loop(chunk):
    T = 23
    rows = []
    for pads in (0, 3, 9):  # left padding at -1, then absolute positions from 0
        rows.append([-1] * pads + list(range(T - pads)))
    q_pos = torch.tensor(rows)
    assert torch.equal(attention_mask(q_pos, q_pos, chunk), mask_by_loops(q_pos, q_pos, chunk))
    # decoding: queries at later positions against a cache holding shuffled slots (a ring) and empty ones
    torch.manual_seed(0)
    k_pos = torch.stack([torch.randperm(30) - 2 for _ in range(3)]).clamp(min=-1)  # some -1 = empty slots
    q_pos = torch.tensor([[27, 28], [16, 17], [8, 9]])
    assert torch.equal(attention_mask(q_pos, k_pos, chunk), mask_by_loops(q_pos, k_pos, chunk))


def test_temperature_matches_formula_around_floor_scale():
    fs, a = 8192.0, 0.1
    positions = [0, 1, 8190, 8191, 8192, 8193, 16382, 16383, 16384, 100000, 1000000, 10485759]
    ours = temperature(torch.tensor(positions), fs, a)
    for p, t in zip(positions, ours.tolist()):
        assert t == pytest.approx(math.log(math.floor((p + 1) / fs) + 1) * a + 1, rel=1e-6), p
    # the step happens where p + 1 reaches floor_scale: position 8191 (not 8192) is the first one scaled
    assert ours[2].item() == 1.0
    assert ours[3].item() == pytest.approx(1 + 0.1 * math.log(2), rel=1e-6)
    assert ours[4].item() == ours[3].item()
    assert ours[7].item() == pytest.approx(1 + 0.1 * math.log(3), rel=1e-6)  # 16383: floor(16384 / 8192) = 2


# ------------------------------------------------------------------------------------------------------
# A debug-like model and a brute-force forward
# ------------------------------------------------------------------------------------------------------

SMALL = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=101, n_experts=4, top_k=1,
                  moe_hidden_dim=32, ffn_hidden_dim=48, interleave_moe_layer_step=2, use_qk_norm=True,
                  rope_theta=10000.0,
                  rope_scaling=dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=64),
                  attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=16.0, attn_scale=0.5,
                  max_seq_len=256, image_token_id=7)


def small_model(args=SMALL, seed=0):
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # norm weights that matter
            else:
                p.normal_(0, 0.2)
    return model.eval()


def hand_rms(x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hand_freqs(a: ModelArgs):
    fs = [a.rope_theta ** (-2 * i / a.head_dim) for i in range(a.head_dim // 2)]
    s = a.rope_scaling
    if not s:
        return fs
    out = []
    for f in fs:
        w, L = 2 * math.pi / f, s["original_context"]
        if w < L / s["high_freq_factor"]:
            out.append(f)
        elif w > L / s["low_freq_factor"]:
            out.append(f / s["factor"])
        else:
            t = (L / w - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - t) * f / s["factor"] + t * f)
    return out


def hand_rotate(x, pos, freqs):
    """Interleaved pairs (2i, 2i+1) rotated by pos * f_i. x (B, T, H, D), pos (B, T)."""
    ang = pos.double()[:, :, None, None] * torch.tensor(freqs, dtype=torch.float64)  # (B, T, 1, D/2)
    c, s = ang.cos(), ang.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)


def reference_forward(model: Transformer, tokens, positions):
    """Brute force, in float64, from the weights: what a Llama 4 forward must compute."""
    a = model.args
    W = {n: p.detach().double() for n, p in model.state_dict().items()}
    B, T = tokens.shape
    masks = {c: mask_by_loops(positions, positions, c)[:, 0] for c in (None, a.attention_chunk_size)}
    freqs = hand_freqs(a)
    temp = torch.tensor([[math.log(math.floor((p + 1) / a.floor_scale) + 1) * a.attn_scale + 1 for p in row]
                         for row in positions.tolist()], dtype=torch.float64)  # (B, T)
    h = W["tok_embeddings.weight"][tokens]
    group = a.n_heads // a.n_kv_heads
    for i in range(a.n_layers):
        p = f"layers.{i}."
        rope = i not in a.nope_layers
        x = hand_rms(h, a.norm_eps) * W[p + "attention_norm.weight"]
        q = (x @ W[p + "attention.wq.weight"].t()).view(B, T, a.n_heads, a.head_dim)
        k = (x @ W[p + "attention.wk.weight"].t()).view(B, T, a.n_kv_heads, a.head_dim)
        v = (x @ W[p + "attention.wv.weight"].t()).view(B, T, a.n_kv_heads, a.head_dim)
        if rope:
            q, k = hand_rotate(q, positions, freqs), hand_rotate(k, positions, freqs)
            if a.use_qk_norm:
                q, k = hand_rms(q, a.norm_eps), hand_rms(k, a.norm_eps)
        elif a.attn_temperature_tuning:
            q = q * temp[:, :, None, None]
        mask = masks[a.attention_chunk_size if rope else None]  # (B, T, T)
        out = torch.zeros(B, T, a.n_heads, a.head_dim, dtype=torch.float64)
        for hh in range(a.n_heads):
            kh, vh = k[:, :, hh // group], v[:, :, hh // group]  # GQA: query head h reads kv head h // group
            scores = q[:, :, hh] @ kh.transpose(1, 2) / math.sqrt(a.head_dim)  # (B, T, T)
            scores = scores.masked_fill(~mask, float("-inf"))
            out[:, :, hh] = torch.softmax(scores, -1) @ vh
        h = h + out.reshape(B, T, -1) @ W[p + "attention.wo.weight"].t()
        x = hand_rms(h, a.norm_eps) * W[p + "ffn_norm.weight"]
        swiglu = lambda x, w1, w3, w2: (F.silu(x @ w1) * (x @ w3)) @ w2  # noqa: E731
        f = p + "feed_forward."
        if i in a.moe_layers:
            y = swiglu(x, W[f + "shared_expert.w1.weight"].t(), W[f + "shared_expert.w3.weight"].t(),
                       W[f + "shared_expert.w2.weight"].t())
            logits = x @ W[f + "router.weight"].t()  # (B, T, E)
            chosen = torch.topk(logits, a.top_k, -1).indices
            for e in range(a.n_experts):
                gate = torch.sigmoid(logits[..., e:e + 1])
                is_e = (chosen == e).any(-1, keepdim=True).double()
                y = y + is_e * swiglu(gate * x, W[f + "experts.w1"][e], W[f + "experts.w3"][e], W[f + "experts.w2"][e])
        else:
            y = swiglu(x, W[f + "w1.weight"].t(), W[f + "w3.weight"].t(), W[f + "w2.weight"].t())
        h = h + y
    return hand_rms(h, a.norm_eps) * W["norm.weight"] @ W["output.weight"].t()


T_LONG = 40  # 5 chunks of 8: 4 chunk boundaries; temperature steps at 15 and 31 (floor_scale 16)


@pytest.fixture(scope="module")
def small():
    model = small_model()
    torch.manual_seed(1)
    tokens = torch.randint(0, SMALL.vocab_size, (1, T_LONG))
    with torch.no_grad():
        full = model(tokens)
    return model, tokens, full


def test_forward_matches_brute_force_reference(small):
    model, tokens, full = small
    ref = reference_forward(model, tokens, torch.arange(T_LONG)[None])
    assert full.shape == (1, T_LONG, SMALL.vocab_size)
    torch.testing.assert_close(full.double(), ref, atol=2e-4, rtol=1e-4)
    # the reference is sensitive to what it checks: no chunking, or no temperature, gives other logits
    unchunked = reference_forward(_with_args(model, attention_chunk_size=None), tokens, torch.arange(T_LONG)[None])
    assert (unchunked - ref)[:, 8:].abs().max() > 1e-2 and (unchunked - ref)[:, :8].abs().max() < 1e-9
    untuned = reference_forward(_with_args(model, attn_temperature_tuning=False), tokens, torch.arange(T_LONG)[None])
    assert (untuned - ref)[:, 15:].abs().max() > 1e-2 and (untuned - ref)[:, :15].abs().max() < 1e-9


def test_forward_with_a_partial_last_chunk_matches_brute_force_reference(small):
    model, tokens, _ = small
    t = tokens[:, :37]  # 4 whole chunks of 8, then 5 tokens: attention chunk by chunk, and a partial tail
    with torch.no_grad():
        out = model(t)
    torch.testing.assert_close(out.double(), reference_forward(model, t, torch.arange(37)[None]), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [5, 8, 24, 29])
def test_causal_in_chunks_equals_attention_under_the_chunk_mask(T):
    """Softmax over the keys the double-loop mask allows, per head (GQA: 4 query heads per KV head), in fp64;
    and the gradients agree with SDPA under the mask."""
    torch.manual_seed(T)
    q = torch.randn(2, 8, T, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos = torch.arange(T)[None].expand(2, T)
    mask = mask_by_loops(pos, pos, 8)  # (B, 1, T, T)
    scores = q @ k.repeat_interleave(4, 1).transpose(-1, -2) / 4.0  # (B, H, T, T); 1/sqrt(16)
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(4, 1)
    got = causal_in_chunks(q, k, v, 8)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for a, b in zip(grads, torch.autograd.grad(masked, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _with_args(model, **changes):
    clone = Transformer(replace(model.args, **changes)).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_last_only_and_positions_argument(small):
    model, tokens, full = small
    with torch.no_grad():
        last = model(tokens, last_only=True)
        explicit = model(tokens, positions=torch.arange(T_LONG)[None])  # the masked (not is_causal) path
    assert last.shape == (1, 1, SMALL.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------------

def decode_in_pieces(model, tokens, pieces, max_len=64):
    cache = model.make_cache(tokens.shape[0], max_len)
    outs, t = [], 0
    with torch.no_grad():
        for n in pieces:
            outs.append(model(tokens[:, t:t + n], cache=cache))
            t += n
            assert cache.next_pos.tolist() == [t] * tokens.shape[0]
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("prefill", [1, 7, 8, 9, 20])
def test_cached_decode_equals_full_forward(small, prefill):
    model, tokens, full = small
    got, _ = decode_in_pieces(model, tokens, [prefill] + [1] * (T_LONG - prefill))
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pieces", [[13, 5] + [1] * 22, [3, 17, 20], [8, 8, 8, 16], [1, 39]])
def test_prefill_in_pieces_equals_full_forward(small, pieces):
    model, tokens, full = small
    got, _ = decode_in_pieces(model, tokens, pieces)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_rope_layer_cache_holds_one_chunk_nope_layer_holds_all(small):
    model = small[0]
    for max_len in (40, 1000):
        cache = model.make_cache(2, max_len)
        for i, c in enumerate(cache.layers):
            want = max_len if i in SMALL.nope_layers else 8
            assert c.k.shape == (2, want, SMALL.n_kv_heads, SMALL.head_dim), (i, max_len)
            assert c.v.shape == c.k.shape
    # the sizes do not grow while decoding past several chunks
    _, cache = decode_in_pieces(model, small[1], [9] + [1] * 31, max_len=40)
    assert [c.k.shape[1] for c in cache.layers] == [8, 8, 8, 40]
    # memory: 3 RoPE layers x 8 slots + 1 NoPE layer x 1000 slots, for k and v (fp32) and the int64 positions
    cache = model.make_cache(1, 1000)
    slots = 3 * 8 + 1000
    assert cache.nbytes() == slots * (2 * SMALL.n_kv_heads * SMALL.head_dim * 4 + 8)
    # a cache shorter than a chunk is no bigger than max_len
    assert [c.k.shape[1] for c in model.make_cache(1, 5).layers] == [5, 5, 5, 5]


def test_nope_cache_overflow_is_a_clear_error(small):
    model, tokens, _ = small
    cache = model.make_cache(1, 16)
    with torch.no_grad():
        model(tokens[:, :12], cache=cache)
        with pytest.raises(ValueError, match="cache is full"):
            model(tokens[:, 12:20], cache=cache)


def test_left_padded_batch_equals_rows_alone(small):
    model = small[0]
    torch.manual_seed(3)
    lengths = [5, 12, 17]  # inside the first chunk, across one boundary, across two
    T = max(lengths)
    rows = [torch.randint(0, SMALL.vocab_size, (n,)) for n in lengths]
    steps = [torch.randint(0, SMALL.vocab_size, (len(lengths),)) for _ in range(6)]
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)  # pad token 0 on the left
    positions = torch.full((len(lengths), T), -1)
    for b, r in enumerate(rows):
        tokens[b, T - len(r):] = r
        positions[b, T - len(r):] = torch.arange(len(r))
    with torch.no_grad():
        alone = [model(torch.cat([r] + [s[b:b + 1] for s in steps])[None])[0] for b, r in enumerate(rows)]
        no_cache = model(tokens, positions=positions)
        cache = model.make_cache(len(lengths), 64)
        prefill = model(tokens, cache=cache, positions=positions)
        assert cache.next_pos.tolist() == lengths
        decoded = [model(s[:, None], cache=cache)[:, 0] for s in steps]  # positions continue per row
    assert cache.next_pos.tolist() == [n + len(steps) for n in lengths]
    for b, n in enumerate(lengths):
        for got in (no_cache, prefill):
            assert torch.isfinite(got[b]).all()
            torch.testing.assert_close(got[b, T - n:], alone[b][:n], atol=1e-4, rtol=1e-4)
        for i, d in enumerate(decoded):
            torch.testing.assert_close(d[b], alone[b][n + i], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------
# Early fusion
# ------------------------------------------------------------------------------------------------------

def test_embed_replaces_exactly_the_patch_tokens_in_order(small):
    model = small[0]
    P = SMALL.image_token_id
    tokens = torch.tensor([[1, P, P, 3, 4], [P, 5, 6, P, 2]])
    feats = torch.randn(4, SMALL.dim)
    with torch.no_grad():
        h = model.embed(tokens, feats)
        plain = model.tok_embeddings.weight[tokens]
    assert h.shape == (2, 5, SMALL.dim)
    for (b, t), f in zip([(0, 1), (0, 2), (1, 0), (1, 3)], feats):  # row-major order of the <|patch|> tokens
        torch.testing.assert_close(h[b, t], f, atol=0, rtol=0)
    keep = tokens != P
    torch.testing.assert_close(h[keep], plain[keep], atol=0, rtol=0)
    with torch.no_grad():  # and the forward pass uses them
        assert (model(tokens, image_features=feats) - model(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("n", [2, 4, 0])
def test_embed_count_mismatch_is_a_clear_error(small, n):
    P = SMALL.image_token_id
    tokens = torch.tensor([[1, P, P, 3, P]])
    with pytest.raises(ValueError, match=rf"3 <\|patch\|> tokens but {n} image features"):
        small[0].embed(tokens, torch.randn(n, SMALL.dim))


# ------------------------------------------------------------------------------------------------------
# bf16 numerics of the building blocks
# ------------------------------------------------------------------------------------------------------

def test_rmsnorm_bf16_normalizes_in_fp32_casts_then_scales():
    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(256))
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(4, 7, 256) * 30).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    normed = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)  # cast back first
    expected = (normed.float() * norm.weight.float()).to(torch.bfloat16)  # then one bf16-rounded product
    assert torch.equal(y, expected)
    # the order matters: scaling in fp32 before the cast gives other bits somewhere
    other = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).to(torch.bfloat16)
    assert not torch.equal(y, other)


def test_dense_swiglu_bf16_close_to_fp32_by_hand():
    torch.manual_seed(0)
    ff = FeedForward(128, 384)
    with torch.no_grad():
        for p in ff.parameters():
            p.normal_(0, 0.1)
    ff = ff.to(torch.bfloat16)
    x = torch.randn(16, 128).to(torch.bfloat16)
    y = ff(x)
    assert y.dtype == torch.bfloat16
    w1, w3, w2 = (ff.w1.weight.float(), ff.w3.weight.float(), ff.w2.weight.float())
    xf = x.float()
    a = xf @ w1.t()
    expected = ((a * torch.sigmoid(a)) * (xf @ w3.t())) @ w2.t()  # silu written out
    err = (y.float() - expected).abs().max().item()
    assert err <= 2e-2 * expected.abs().max().item(), err  # bf16 rounding of the intermediates


def test_moe_layers_and_nope_layers_of_the_flavors():
    assert FLAVORS["scout"].moe_layers == list(range(48))
    assert FLAVORS["maverick"].moe_layers == list(range(1, 48, 2))
    for f in ("scout", "maverick"):
        assert FLAVORS[f].nope_layers == list(range(3, 48, 4))
    assert FLAVORS["debug"].moe_layers == [1, 3] and FLAVORS["debug"].nope_layers == [3]
    with torch.device("meta"):
        m = Transformer(FLAVORS["maverick"])
    kinds = [type(layer.feed_forward) for layer in m.layers]
    assert kinds == [FeedForward if i % 2 == 0 else MoE for i in range(48)]
    assert m.layers[0].feed_forward.w1.weight.shape == (16384, 5120)
    assert m.layers[1].feed_forward.experts.w1.shape == (128, 5120, 8192)


# ------------------------------------------------------------------------------------------------------
# Building the model: the embedding's init, and no torch._dynamo import on the meta device
# ------------------------------------------------------------------------------------------------------

def test_embedding_init_is_nn_embeddings_and_meta_build_skips_dynamo():
    args = FLAVORS["debug"]
    torch.manual_seed(7)
    model = Transformer(args)
    torch.manual_seed(7)
    reference = torch.nn.Embedding(args.vocab_size, args.dim)  # what nn.Embedding's own init draws
    assert torch.equal(model.tok_embeddings.weight, reference.weight)
    assert model.tok_embeddings.weight.requires_grad
    torch.manual_seed(7)
    reference = torch.nn.Embedding(args.vocab_size, args.dim)
    assert torch.equal(torch.nn.Linear(args.dim, args.dim).weight, model.layers[0].attention.wq.weight)  # RNG in step
    # Building on the meta device (as checkpoint.load_model does) must not import torch._dynamo (~1.5 s).
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from model import FLAVORS, Transformer\n"
            "with torch.device('meta'):\n    Transformer(FLAVORS['scout'])\n"
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"

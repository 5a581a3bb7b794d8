"""cpu_decode.py: fused, oneDNN-packed weight products compute what the plain model computes.

The plain model is the reference here; it is itself checked against transformers and Meta's code (test_parity_*)
and a brute-force attention (test_model.py). Every test runs twice: with the weights packed for oneDNN, and with
packing switched off (the fallback for CPUs and dtypes oneDNN cannot take: fused plain tensors and F.linear).
"""
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cpu_decode  # noqa: E402
from cpu_decode import PackedLinear, packed_weights, prepare_for_decode  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from moe import MoE  # noqa: E402

# Dense and MoE layers (4 experts, top-1), chunked attention (chunks of 8) with a NoPE layer (3) and its
# temperature tuning, QK-norm: every kind of product and every attention path a decode step takes.
ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=101, n_experts=4, top_k=1,
                 moe_hidden_dim=32, ffn_hidden_dim=48, interleave_moe_layer_step=2, use_qk_norm=True,
                 rope_theta=10000.0, rope_scaling=None, attention_chunk_size=8, attn_temperature_tuning=True,
                 floor_scale=16.0, attn_scale=0.5, max_seq_len=256)
T = 40  # 5 chunks; NoPE temperature steps at positions 15 and 31


@pytest.fixture(params=["packed", "plain"])
def packing(request, monkeypatch):
    if request.param == "packed" and not cpu_decode.packs(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN")
    if request.param == "plain":
        monkeypatch.setattr(cpu_decode, "packs", lambda dtype: False)
    return request.param


def random_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_the_product_in_float64(packing, dtype):
    if packing == "packed" and not cpu_decode.packs(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
    torch.manual_seed(0)
    w = torch.randn(48, 64).to(dtype)
    layer = PackedLinear(w)
    assert layer.packed == (packing == "packed")
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # float32 rounding; bf16's 8 bits of mantissa
    for shape in [(1, 64), (3, 5, 64)]:  # one decoded token; a batch of prompts
        x = torch.randn(shape).to(dtype)
        want = x.double() @ w.double().T
        got = layer(x)
        assert got.shape == want.shape and got.dtype == dtype
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol
    if dtype == torch.float32:  # and as F.linear does, to its own rounding
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_prepared_model_decodes_as_the_plain_one(packing):
    """Prefill 30 tokens, then decode 10 one at a time from the cache (crossing chunk boundaries and the
    NoPE temperature step at 31): logits equal to the plain model's full forward within float32 rounding."""
    plain = random_model()
    tokens = torch.randint(0, ARGS.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain(tokens)
        model = prepare_for_decode(random_model())
        assert model.prepared_for_decode
        cache = model.make_cache(2, T)
        got = [model(tokens[:, :30], cache=cache)]
        got += [model(tokens[:, t:t + 1], cache=cache) for t in range(30, T)]
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-5, rtol=2e-5)
    # what it replaced: three projections by one, the SwiGLUs' gate and up by one, the experts by products
    a, moe = model.layers[0].attention, model.layers[1].feed_forward
    assert a.wq is None and a.wqkv.out_features == (4 + 2 + 2) * 16
    assert moe.shared_expert.w1 is None and moe.shared_expert.w13.out_features == 2 * 32
    assert moe.experts.w1 is None and len(moe.experts.fused) == 4
    assert [m.out_features for m in moe.experts.fused[2]] == [2 * 32, 64]
    left = [n for n, p in model.named_parameters() if p.ndim > 1]  # the rest: norms (and expert_bias buffers)
    assert left == ["tok_embeddings.weight", *(f"layers.{i}.feed_forward.router.weight" for i in (1, 3))]


def test_generate_gives_the_same_tokens_prepared(packing):
    """Left-padded batch, greedy: generate.py's loop gives the plain model's tokens."""
    from generate import generate

    prompts = [[5, 9, 2, 44, 17, 3, 8, 21, 60, 33, 12], [7, 7, 80]]
    with torch.no_grad():
        want = generate(random_model(), prompts, 20, temperature=0)
        got = generate(prepare_for_decode(random_model()), prompts, 20, temperature=0)
    assert got == want


def test_bf16_prepared_model_stays_within_bf16_rounding(packing):
    plain = random_model(torch.bfloat16)
    prepared = prepare_for_decode(random_model(torch.bfloat16))
    tokens = torch.randint(0, ARGS.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = random_model().to(torch.float32)(tokens)  # the float32 model: how far bf16 is from exact
        a, b = plain(tokens).float(), prepared(tokens).float()
    scale = want.abs().max()
    plain_err, prepared_err = (a - want).abs().max() / scale, (b - want).abs().max() / scale
    assert prepared_err < 2 * plain_err + 1e-3, (plain_err, prepared_err)  # no worse than bf16 already is


def test_prepared_model_is_for_inference_only_and_preparing_twice_changes_nothing(packing):
    model = prepare_for_decode(random_model())
    with pytest.raises(RuntimeError, match="prepare_for_decode"):
        model.state_dict()
    n = len(packed_weights(model))
    # 4 layers x (wqkv, wo); 2 dense x (w13, w2); 2 MoE x (shared w13, w2, 4 experts x 2); the head
    assert n == 8 + 4 + 2 * (2 + 8) + 1
    tokens = torch.randint(0, ARGS.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(tokens)
        prepare_for_decode(model)
        assert len(packed_weights(model)) == n and torch.equal(model(tokens), before)


def test_quantized_experts_are_left_quantized(packing):
    """An int4 model: the experts stay quantized (their own kernels), the rest is fused and packed."""
    from quantize import QuantizedExperts, quantize_model

    tokens = torch.randint(0, ARGS.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = quantize_model(random_model(), "int4")(tokens)
        model = prepare_for_decode(quantize_model(random_model(), "int4"))
        got = model(tokens)
    moe = model.layers[1].feed_forward
    assert isinstance(moe, MoE) and isinstance(moe.experts, QuantizedExperts)
    assert model.layers[1].attention.wqkv is not None and moe.shared_expert.w13 is not None
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_packs_only_where_this_pytorch_has_the_internal_ops(monkeypatch):
    """The packing ops are internal to PyTorch (torch.compile's CPU backend emits them): a release without them
    must fall back to plain weights, not fail at the first product. fp16 is never packed."""
    assert not cpu_decode.packs(torch.float16)
    w, x = torch.randn(6, 5), torch.randn(2, 5)
    monkeypatch.setattr(torch.ops, "mkldnn", type("WithoutTheOps", (), {})())
    assert not cpu_decode.packs(torch.float32) and not cpu_decode.packs(torch.bfloat16)
    lin = PackedLinear(w)
    assert not lin.packed
    torch.testing.assert_close(lin(x), x @ w.T)


# --------------------------------------------------------------------------------------------------------
# Compiled one-token steps (prepare_for_decode(..., compile=True)); torch.compile's CPU backend needs a C++
# compiler. The reference is the plain model's full forward over the whole sequence.
# --------------------------------------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")


@pytest.fixture(scope="module")
def compiled_fp32():
    return prepare_for_decode(random_model(), compile=True)


@needs_compiler
def test_compiled_steps_decode_as_the_plain_model(compiled_fp32):
    """Prefill 5 tokens, then 33 compiled steps (the RoPE layers' 8-slot rings wrap four times, the NoPE
    temperature steps up at 15 and 31), then 2 tokens through the eager model on the same cache: every logit
    equals the plain model's full forward within float32 rounding, so the graph kept the cache's books."""
    tokens = torch.randint(0, ARGS.vocab_size, (1, T), generator=torch.Generator().manual_seed(5))
    model = compiled_fp32
    with torch.no_grad():
        want = random_model()(tokens)
        cache = model.make_cache(1, T)
        got = [model(tokens[:, :5], cache=cache)]
        got += [model(tokens[:, t:t + 1], cache=cache) for t in range(5, T - 2)]
        assert model.decode_step.compiled and int(cache.next_pos) == T - 2
        assert all(c.seen == T - 2 for c in cache.layers)
        got.append(model(tokens[:, T - 2:], cache=cache))  # two tokens: the eager forward
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-5, rtol=2e-5)
    # the weights it reads: fused, not packed; the experts as two stacks, each expert's products views of them
    moe = model.layers[1].feed_forward
    assert not any(m.packed for m in model.modules() if isinstance(m, PackedLinear))
    w13, w2 = moe.experts.stacks
    assert w13.shape == (4, 2 * 32, 64) and w2.shape == (4, 64, 32)
    assert moe.experts.fused[3][0].w.data_ptr() == w13[3].data_ptr()


@needs_compiler
def test_compiled_generate_gives_the_plain_tokens_and_refuses_a_full_cache(compiled_fp32):
    """generate.py's loop, greedy: the plain model's tokens, with a cache of another size than the graph was
    first compiled for, and from a second model of the same shapes (its own weights, not the first's)."""
    from generate import generate

    prompt = [[5, 9, 2, 44, 17, 3, 8, 21, 60, 33, 12]]
    with torch.no_grad():
        want = generate(random_model(), prompt, 25, temperature=0)
        assert generate(compiled_fp32, prompt, 25, temperature=0) == want
        other = generate(random_model(seed=3), prompt, 25, temperature=0)
        assert other != want
        assert generate(prepare_for_decode(random_model(seed=3), compile=True), prompt, 25, temperature=0) == other
        cache = compiled_fp32.make_cache(1, 12)  # the NoPE layer keeps every token: 12 slots
        compiled_fp32(torch.tensor([prompt[0]]), cache=cache)
        compiled_fp32(torch.tensor([[1]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            compiled_fp32(torch.tensor([[2]]), cache=cache)


@needs_compiler
def test_compiled_bf16_steps_stay_within_bf16_rounding():
    tokens = torch.randint(0, ARGS.vocab_size, (1, T), generator=torch.Generator().manual_seed(6))
    model = prepare_for_decode(random_model(torch.bfloat16), compile=True)
    with torch.no_grad():
        want = random_model()(tokens)  # the float32 model: how far bf16 is from exact
        plain = random_model(torch.bfloat16)(tokens).float()
        cache = model.make_cache(1, T)
        got = torch.cat([model(tokens[:, :5], cache=cache)] +
                        [model(tokens[:, t:t + 1], cache=cache) for t in range(5, T)], 1).float()
    scale = want.abs().max()
    plain_err, compiled_err = (plain - want).abs().max() / scale, (got - want).abs().max() / scale
    assert compiled_err < 2 * plain_err + 1e-3, (plain_err, compiled_err)


def test_compiled_steps_refuse_what_they_cannot_run():
    from dataclasses import replace

    from quantize import quantize_model

    with pytest.raises(ValueError, match="top-1"):
        prepare_for_decode(Transformer(replace(ARGS, top_k=2)).eval(), compile=True)
    with pytest.raises(ValueError, match="quantized"):
        prepare_for_decode(quantize_model(random_model(), "int4"), compile=True)
    with pytest.raises(ValueError, match="compile"):
        cpu_decode.CompiledSteps(prepare_for_decode(random_model()))  # packed weights: opaque to the graph
    from checkpoint import load_model
    with pytest.raises(ValueError, match="for_decode"):  # said before looking for the checkpoint
        load_model("/nonexistent", compile=True)


@needs_compiler
def test_a_failed_compile_says_so(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    torch._dynamo.reset()  # forget the graphs the tests before compiled
    model = prepare_for_decode(random_model(seed=7), compile=True)
    with torch.no_grad():
        cache = model.make_cache(1, 8)
        model(torch.tensor([[1, 2]]), cache=cache)
        with pytest.raises(cpu_decode.CompileError, match="C\\+\\+ compiler"):
            model(torch.tensor([[3]]), cache=cache)

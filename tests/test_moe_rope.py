"""Tests for moe.py and rope.py against references written here by hand.

MoE: the grouped dispatch is compared with the references' way (every expert on every token, zeros for the
unchosen), written out below; only the chosen experts may run; the gate is sigmoid(raw logit) on the expert's
input; the load-balancing bias moves by the hand-worked rule and only changes the choice.
RoPE: interleaved pairs rotated one 2x2 rotation at a time (not rotate_half); Llama 3 scaling written out per
frequency in Python floats; the iRoPE schedule.
"""
import contextlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe  # noqa: E402
from moe import MoE, update_expert_bias  # noqa: E402
from rope import apply_rope, apply_rope_real, llama3_scale, nope_layers, rope_angles, rope_frequencies  # noqa: E402

D, FH, E = 16, 24, 6  # small sizes: model width, expert width, experts



def make_moe(top_k=1, dtype=torch.float32, seed=0, n_experts=E):
    torch.manual_seed(seed)
    m = MoE(D, FH, n_experts, top_k)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.to(dtype)


def swiglu(x, w1, w3, w2):
    """One expert by hand: w2(silu(x w1) * (x w3)), weights as stored (D, F), (D, F), (F, D)."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def dense_reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The references' MoE: every expert on every token, multiplied by 0 where not chosen.

    Choice: top-k of (raw logits + selection bias); gate: sigmoid(raw logit), applied to the expert's input.
    """
    logits = x @ m.router.weight.t()  # (N, E)
    chosen = torch.topk(logits + m.expert_bias, m.top_k, dim=-1).indices  # (N, k)
    out = m.shared_expert.w2(F.silu(m.shared_expert.w1(x)) * m.shared_expert.w3(x))
    for e in range(m.n_experts):
        is_e = (chosen == e).any(-1, keepdim=True).to(x.dtype)  # (N, 1)
        gate = torch.sigmoid(logits[:, e:e + 1].float()).to(x.dtype)
        out = out + is_e * swiglu(gate * x, m.experts.w1[e], m.experts.w3[e], m.experts.w2[e])
    return out


def routings():
    """(name, top_k, N, bias) for random and degenerate routings."""
    all_to_2 = torch.zeros(E)
    all_to_2[2] = 100.0  # every token chooses expert 2 (its gate still comes from the raw logit)
    two_only = torch.full((E,), -100.0)
    two_only[[1, 4]] = 100.0  # top-2 always {1, 4}: the other experts are empty
    return [("random", 1, 40, None), ("random", 2, 40, None), ("all-to-one", 1, 25, all_to_2),
            ("all-to-one", 2, 25, all_to_2), ("two-experts", 2, 17, two_only), ("few-tokens", 1, 3, None),
            ("decode", 1, 1, None), ("decode", 2, 1, None)]


@pytest.mark.parametrize("name,top_k,n,bias", routings(), ids=lambda v: str(v) if not torch.is_tensor(v) else "b")
def test_dispatch_equals_every_expert_fp32_and_grads(name, top_k, n, bias):
    m = make_moe(top_k)
    if bias is not None:
        m.expert_bias.copy_(bias)
    x = torch.randn(n, D, requires_grad=True)
    y = m(x)
    if name == "all-to-one":
        assert (m.last_expert_ids[:, 0] == 2).all()
    if name == "two-experts":
        assert set(m.last_expert_ids.flatten().tolist()) == {1, 4}
    x2 = x.detach().clone().requires_grad_(True)
    ref = dense_reference(m, x2)
    assert y.shape == (n, D)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    # gradients of the input and of every weight, through a loss that weights the outputs unevenly
    w = torch.randn(n, D)
    gx, *gp = torch.autograd.grad((y * w).sum(), [x, *m.parameters()])
    rx, *rp = torch.autograd.grad((ref * w).sum(), [x2, *m.parameters()])
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-6)
    for (pname, _), a, b in zip(m.named_parameters(), gp, rp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda s: f"{pname}: {s}")


def test_dispatch_unchosen_experts_get_zero_grad():
    m = make_moe(1)
    m.expert_bias[3] = 100.0
    m(torch.randn(10, D)).sum().backward()
    for e in range(E):
        assert (m.experts.w1.grad[e].abs().sum() > 0) == (e == 3)


def full_size_gradients_in_backward(m: MoE, x: torch.Tensor) -> int:
    """How many tensors of one expert stack's size (w1, w3 and w2 hold as many numbers) backward allocates."""
    from torch.profiler import ProfilerActivity, profile

    m.zero_grad(set_to_none=True)
    y = m(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return sum(1 for ev in prof.events() if ev.self_cpu_memory_usage == m.experts.w1.nbytes)


def test_backward_stacks_each_expert_gradient_once_with_the_same_numbers(monkeypatch):
    """Indexing w1[e] per expert makes autograd build a whole-stack-sized gradient per expert used and sum them;
    taking the stacks apart once (Experts.taken_apart) builds one per stack. The numbers are the same."""
    m = make_moe(top_k=2)
    x = torch.randn(30, D)
    assert len(set(torch.topk(m.router(x), 2).indices.flatten().tolist())) == E  # every expert is used
    assert full_size_gradients_in_backward(m, x) == 3  # one per stack: w1, w3, w2
    new = [p.grad.clone() for p in m.experts.parameters()]
    monkeypatch.setattr(moe.Experts, "taken_apart", lambda self: contextlib.nullcontext())  # index per expert
    assert full_size_gradients_in_backward(m, x) >= 3 * E
    for a, p in zip(new, m.experts.parameters()):
        assert torch.equal(a, p.grad)


def test_compiled_moe_does_not_recompile_for_new_expert_counts():
    """torch.compile (train.py --compile) traces the layer once: with keep_dispatch_eager the dispatch loop,
    whose trip counts are the tokens per expert, stays eager. Compiled through, it recompiled for every batch."""
    import torch._dynamo

    m, graphs = make_moe(top_k=1), []

    def count_graphs(gm, example_inputs):  # a torch.compile backend that runs the graph as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    moe.keep_dispatch_eager(m)
    compiled = torch.compile(m, backend=count_graphs)
    traced = []
    for seed in range(6):  # six batches of 3 tokens: each leaves a different set of experts empty
        x = torch.randn(3, D, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(x), m(x))
        traced.append(len(graphs))
    torch._dynamo.reset()
    assert traced[1:] == traced[:1] * 5, traced  # compiled through the loop: a new graph per batch


@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatch_bf16_close_to_reference(top_k):
    m = make_moe(top_k, dtype=torch.bfloat16)
    x = torch.randn(64, D, dtype=torch.bfloat16)
    y = m(x)
    ref = dense_reference(m, x)
    # both run the same bf16 matmuls per token; sums may round differently: a few bf16 ulps of the output scale
    scale = ref.float().abs().max().item()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= 2e-2 * scale, (err, scale)
    # and both are close to the fp32 computation of the same bf16 weights
    ref32 = dense_reference(make_moe(top_k, dtype=torch.bfloat16).float(), x.float())
    assert (y.float() - ref32).abs().max().item() <= 3e-2 * scale


@pytest.mark.parametrize("top_k,n,bias", [(1, 30, None), (2, 30, None), (1, 1, None), (1, 12, "one")])
def test_dispatch_runs_only_the_chosen_experts_on_their_tokens(monkeypatch, top_k, n, bias):
    m = make_moe(top_k)
    if bias == "one":
        m.expert_bias[5] = 100.0
    calls = []
    original = moe.Experts.expert

    def spy(self, e, xs):
        calls.append((e, xs.detach().clone()))
        return original(self, e, xs)

    monkeypatch.setattr(moe.Experts, "expert", spy)
    x = torch.randn(n, D)
    with torch.no_grad():
        m(x)
        logits = x @ m.router.weight.t()
    chosen = torch.topk(logits + m.expert_bias, top_k, dim=-1).indices  # (N, k)
    distinct = sorted(set(chosen.flatten().tolist()))
    assert [e for e, _ in calls] == distinct  # one call per distinct chosen expert, none for the others
    for e, xs in calls:
        rows = [t for t in range(n) if e in chosen[t].tolist()]  # this expert's tokens, in order
        expected = torch.sigmoid(logits[rows, e])[:, None] * x[rows]
        torch.testing.assert_close(xs, expected, atol=1e-6, rtol=1e-6)


def test_gate_is_sigmoid_of_raw_logit_on_the_expert_input():
    m = make_moe(1)
    m.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0, 0.0]))  # choose 3; the gate ignores the bias
    x = torch.randn(9, D) * 3
    with torch.no_grad():
        y = m(x)
        shared = m.shared_expert(x)
        logit = x @ m.router.weight[3]  # raw logit of expert 3, (N,)
        g = torch.sigmoid(logit)[:, None]
        w1, w3, w2 = m.experts.w1[3], m.experts.w3[3], m.experts.w2[3]
        on_input = shared + swiglu(g * x, w1, w3, w2)
        on_output = shared + g * swiglu(x, w1, w3, w2)
        biased = shared + swiglu(torch.sigmoid(logit + 50.0)[:, None] * x, w1, w3, w2)
        softmax = shared + swiglu(torch.softmax(x @ m.router.weight.t(), -1)[:, 3:4] * x, w1, w3, w2)
    assert (m.last_expert_ids[:, 0] == 3).all()
    torch.testing.assert_close(y, on_input, atol=1e-6, rtol=1e-6)
    for wrong in (on_output, biased, softmax):  # the alternatives really differ for a nonlinear expert
        assert (y - wrong).abs().max() > 1e-2


def test_update_expert_bias_hand_computed():
    m = make_moe(1, n_experts=4)
    m.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 0.0, 2.0]))
    m.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.0]))
    update_expert_bias(m, coeff=0.01)
    # mean load 3: sign(mean - load) = [-1, +1, +1, +1]; times 0.01; centered: minus 0.005
    expected = torch.tensor([0.5 - 0.015, -0.5 + 0.005, 0.005, 0.005])
    torch.testing.assert_close(m.expert_bias, expected, atol=1e-7, rtol=0)
    assert m.tokens_per_expert.sum() == 0  # counts start over
    update_expert_bias(m, coeff=0.01)  # no tokens seen since: nothing moves
    torch.testing.assert_close(m.expert_bias, expected, atol=1e-7, rtol=0)


def test_training_counts_loads_and_eval_does_not():
    m = make_moe(2)
    x = torch.randn(50, D)
    m.train()
    m(x)
    m(x[:7])
    ids = torch.topk(x @ m.router.weight.t().detach(), 2, -1).indices
    expected = torch.bincount(ids.flatten(), minlength=E) + torch.bincount(ids[:7].flatten(), minlength=E)
    assert m.tokens_per_expert.tolist() == expected.float().tolist()
    m.eval()
    m(x)
    assert m.tokens_per_expert.tolist() == expected.float().tolist()


def test_bias_balancing_makes_a_skewed_router_uniform_without_touching_gates():
    torch.manual_seed(1)
    m = make_moe(1, n_experts=4)
    x = torch.randn(400, D) + 1.0  # inputs share a common direction ...
    with torch.no_grad():
        m.router.weight.copy_(torch.randn(4, D) * 0.05)
        m.router.weight[0] += 0.3  # ... which expert 0 loves: a skewed router
        raw = x @ m.router.weight.t()

    def loads():
        return torch.bincount(m.last_expert_ids.flatten(), minlength=4).float()

    m.train()
    with torch.no_grad():
        m(x)
    before = loads()
    assert before[0] > 300  # really skewed
    for _ in range(300):
        with torch.no_grad():
            m(x)
        update_expert_bias(m, coeff=0.02)
    with torch.no_grad():
        m(x)
    after = loads()
    assert abs(m.expert_bias.mean().item()) < 1e-5  # centered updates keep mean 0
    assert after.max() - after.min() < 0.25 * (before.max() - before.min()), (before, after)
    assert after.std() < 0.25 * before.std()
    # the bias only chose: the gates are still sigmoid of the unbiased logits
    m.eval()
    with torch.no_grad():
        ids, gates = m.route(x)
    assert not torch.equal(ids, raw.argmax(-1, keepdim=True))  # routing did change
    torch.testing.assert_close(gates, torch.sigmoid(raw.gather(-1, ids)), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------------

def test_frequencies_match_the_formula():
    freqs = rope_frequencies(128, 500000.0)
    expected = torch.tensor([500000.0 ** (-2 * i / 128) for i in range(64)])
    torch.testing.assert_close(freqs, expected, rtol=1e-6, atol=0)


def rotate_pairs_by_hand(x, positions, freqs):
    """out[2i] = x[2i] cos - x[2i+1] sin; out[2i+1] = x[2i] sin + x[2i+1] cos, angle = pos * f_i."""
    out = torch.empty_like(x)
    B, T, H, Dh = x.shape
    for t in range(T):
        for i in range(Dh // 2):
            a = positions[t] * freqs[i]
            c, s = math.cos(a), math.sin(a)
            x0, x1 = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
            out[:, t, :, 2 * i] = x0 * c - x1 * s
            out[:, t, :, 2 * i + 1] = x0 * s + x1 * c
    return out


def test_apply_rope_is_an_interleaved_pair_rotation_not_rotate_half():
    torch.manual_seed(0)
    Dh = 16
    x = torch.randn(2, 5, 3, Dh, dtype=torch.float64)
    positions = [0, 1, 7, 100, 4097]
    freqs = [10000.0 ** (-2 * i / Dh) for i in range(Dh // 2)]
    cis = rope_angles(torch.tensor(positions), torch.tensor(freqs, dtype=torch.float32))  # (T, D/2)
    ours = apply_rope(x.float(), cis).double()
    expected = rotate_pairs_by_hand(x, positions, freqs)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)  # fp32 angles up to 4097 rad
    # rotate_half pairs i with i + D/2: a different rotation
    ang = torch.tensor(positions, dtype=torch.float64)[:, None] * torch.tensor(freqs * 2, dtype=torch.float64)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    rotate_half = torch.cat([-x[..., Dh // 2:], x[..., :Dh // 2]], -1)
    assert (ours - (x * cos + rotate_half * sin)).abs().max() > 0.1
    # the norm of each pair is kept
    pairs = lambda t: t.reshape(*t.shape[:-1], -1, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(ours), pairs(x), atol=1e-5, rtol=1e-5)


def test_apply_rope_real_is_the_same_rotation_by_hand():
    """The real-arithmetic form (for the compiled decode step) against the same by-hand rotation."""
    torch.manual_seed(0)
    Dh, positions = 16, [0, 1, 7, 100, 4097]
    x = torch.randn(5, 3, Dh, dtype=torch.float64)  # (T, H, D)
    freqs = [10000.0 ** (-2 * i / Dh) for i in range(Dh // 2)]
    angles = torch.tensor(positions, dtype=torch.float32)[:, None] * torch.tensor(freqs, dtype=torch.float32)
    ours = apply_rope_real(x.float(), angles.cos()[:, None], angles.sin()[:, None]).double()  # over heads
    expected = rotate_pairs_by_hand(x[None], positions, freqs)[0]
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def test_apply_rope_keeps_bf16_and_rotates_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 8).to(torch.bfloat16)
    cis = rope_angles(torch.tensor([0, 3, 50, 1000]), rope_frequencies(8, 10000.0))
    y = apply_rope(x, cis)
    assert y.dtype == torch.bfloat16
    expected = rotate_pairs_by_hand(x.double(), [0, 3, 50, 1000], [10000.0 ** (-2 * i / 8) for i in range(4)])
    torch.testing.assert_close(y.double(), expected.to(torch.bfloat16).double(), atol=0, rtol=0.0079)


def llama3_by_hand(f, factor, low, high, L):
    w = 2 * math.pi / f
    if w < L / high:
        return f
    if w > L / low:
        return f / factor
    s = (L / w - low) / (high - low)
    return (1 - s) * f / factor + s * f


def test_llama3_scaling_low_equals_high_is_a_hard_step_at_8192():
    base = rope_frequencies(128, 500000.0)
    scaled = rope_frequencies(128, 500000.0, dict(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                                   original_context=8192))
    assert torch.isfinite(scaled).all()
    wavelengths = [2 * math.pi / (500000.0 ** (-2 * i / 128)) for i in range(64)]
    for i, w in enumerate(wavelengths):
        want = base[i].item() if w < 8192 else base[i].item() / 16
        assert scaled[i].item() == pytest.approx(want, rel=1e-6), (i, w)
    # hand-check both sides of the step: the last kept and the first divided frequency
    first_long = next(i for i, w in enumerate(wavelengths) if w > 8192)
    assert 6000 < wavelengths[first_long - 1] < 8192 < wavelengths[first_long]
    assert scaled[first_long - 1].item() == pytest.approx(500000.0 ** (-2 * (first_long - 1) / 128), rel=1e-6)
    assert scaled[first_long].item() == pytest.approx(500000.0 ** (-2 * first_long / 128) / 16, rel=1e-6)
    # frequencies placed right at and next to the boundary: finite, and kept / divided on the right side
    edge = torch.tensor([2 * math.pi / 8191.0, 2 * math.pi / 8192.0, 2 * math.pi / 8193.0])
    out = llama3_scale(edge, factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_context=8192)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(edge[0].item(), rel=1e-6)
    assert out[2].item() == pytest.approx(edge[2].item() / 16, rel=1e-6)
    assert out[1].item() in (pytest.approx(edge[1].item(), rel=1e-6), pytest.approx(edge[1].item() / 16, rel=1e-6))


def test_llama3_scaling_low_1_high_4_matches_the_formula():
    base = [500000.0 ** (-2 * i / 128) for i in range(64)]
    scaled = rope_frequencies(128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_context=8192))
    expected = [llama3_by_hand(f, 8.0, 1.0, 4.0, 8192) for f in base]
    middle = [i for i, f in enumerate(base) if 2048 <= 2 * math.pi / f <= 8192]
    assert len(middle) >= 3  # the smooth band is really exercised
    for i in range(64):
        assert scaled[i].item() == pytest.approx(expected[i], rel=2e-6), i
    # strictly between the two ends inside the band
    for i in middle:
        assert base[i] / 8 < scaled[i].item() < base[i]


def test_nope_layer_schedule():
    assert nope_layers(48) == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]
    assert nope_layers(48) == [i for i in range(48) if i % 4 == 3]
    assert nope_layers(4) == [3]
    assert nope_layers(3) == []

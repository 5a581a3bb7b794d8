"""Tests for QLoRA in lora.py (adapters over a frozen int4 / FP8 base) and the gradient path through quantize.py.

Oracle: a plain Transformer that holds the dequantized weights (quantize.dequantize into nn.Linear and
moe.Experts) with plain-LoRA adapters copied from the QLoRA model: an independent computation of the same
function. Memory figures are worked out by hand from the debug flavor's shapes.
"""
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import checkpoint
import lora
import quantize as Q
from model import FLAVORS, Transformer, init_weights
from moe import Experts

ARGS = replace(FLAVORS["debug"], vision=None)
TARGETS = list(lora.LINEAR_TARGETS)  # wq wk wv wo w1 w2 w3: every projection the debug model has
RANK, ALPHA = 8, 16.0


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A debug-size checkpoint in this project's layout (fp32), as train.py's --init-from would read."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    init_weights(model)
    path = tmp_path_factory.mktemp("lora") / "base"
    checkpoint.save_checkpoint(model, path)
    return path


def tokens(seed=0, batch=2, length=24):
    return torch.randint(0, ARGS.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_base(path, mode):
    """The base the way the caller loads it: routed experts quantized while they stream in."""
    return checkpoint.load_model(path, dtype=torch.float32, quantize=mode)


def qlora_model(path, mode, random_b=False, seed=1):
    torch.manual_seed(seed)
    model = load_base(path, mode)
    lora.add_lora(model, RANK, ALPHA, TARGETS, quantize=mode)
    if random_b:  # B = 0 makes the adapters invisible and grad A zero; a nonzero B exercises everything
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.normal_(std=0.02)
    return model


def dequantized_twin(model):
    """Independent reference: a plain Transformer whose targeted linears and routed experts hold the
    dequantized weights (quantize.dequantize, then nn.Linear / moe.Experts), with plain LoRA adapters
    holding copies of `model`'s adapters."""
    state = model.state_dict()
    twin = Transformer(ARGS)
    own = {}
    for name, t in twin.state_dict().items():
        if name in state:  # embeddings, norms, router, balancing bias: never quantized
            own[name] = state[name]
        elif name.endswith(".weight"):  # a targeted linear: <module>.base.qweight / .scale in the QLoRA model
            pre = name[:-len("weight")] + "base."
            own[name] = Q.dequantize(state[pre + "qweight"], state[pre + "scale"], model.quantization["mode"])
        else:  # routed experts (E, D, F) / (E, F, D), stored quantized transposed
            q, s = state[name + ".qweight"], state[name + ".scale"]
            own[name] = Q.dequantize(q, s, model.quantization["mode"]).transpose(-1, -2)
    twin.load_state_dict(own)
    assert not any(isinstance(m, (Q.QuantizedLinear, Q.QuantizedExperts)) for m in twin.modules())
    assert all(type(m) is Experts for n, m in twin.named_modules() if n.endswith("experts"))
    if lora.lora_modules(model):
        lora.add_lora(twin, RANK, ALPHA, TARGETS)
        twin.load_state_dict(lora.lora_state_dict(model), strict=False)
    return twin


def next_token_loss(model, x):
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------------
# 1. Step 0: the adapters are invisible, the quantized base computes what its dequantized weights compute
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_step0_is_the_quantized_base(base_ckpt, mode):
    model = qlora_model(base_ckpt, mode)
    adapted = lora.lora_modules(model)
    assert len(adapted) == 4 * 4 + 4 * 3  # 4 attention projections per layer + w1/w2/w3 (dense or shared)
    assert all(isinstance(m.base, Q.QuantizedLinear) and m.base.mode == mode and m.weight is None
               for m in adapted.values())
    assert not any(type(m) is nn.Linear and n.rsplit(".", 1)[-1] in TARGETS for n, m in model.named_modules())
    # every quantized module, the routed experts' too, keeps off the fused CUDA kernels (no backward, int4's
    # layout unreadable, FP8 rounding activations); the merged model gets them back
    assert not any(m.fused for m in model.modules() if isinstance(m, Q.QuantizedLinear))
    assert all(m.fused for m in lora.merged_copy(model).modules() if isinstance(m, Q.QuantizedLinear))

    # the same base quantized by quantize.py itself (all four kinds of module), no adapters
    plain_q = Q.quantize_model(load_base(base_ckpt, mode), mode, targets=("experts", "shared", "dense", "attention"))
    fp32 = checkpoint.load_model(base_ckpt, dtype=torch.float32)
    twin = dequantized_twin(model)
    x = tokens()
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, plain_q(x))  # B = 0: the detour adds exact zeros
        assert (y - twin(x)).abs().max() < 1e-5
        # and the test can fail: quantization moved the logits by far more than 1e-5
        assert (y - fp32(x)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# 2. Gradients flow through the frozen quantized layers, to the adapters only
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_quantized_layers_pass_the_input_gradient(mode, monkeypatch):
    """QuantizedLinear and QuantizedExperts in train mode: d/dx equals that of the dequantized matmul. A small
    tile size makes the forward and the backward run over several row tiles."""
    monkeypatch.setattr(Q, "TILE_ELEMENTS", 64 * 256)  # 64 rows of 256 inputs per tile
    torch.manual_seed(0)
    lin = Q.QuantizedLinear(256, 320, mode)
    lin.set_weight(torch.randn(320, 256) * 0.05)
    experts = Q.QuantizedExperts(3, 256, 192, mode)
    for name, (i, o) in (("w1", (256, 192)), ("w3", (256, 192)), ("w2", (192, 256))):
        getattr(experts, name).set_weight(torch.randn(3, o, i) * 0.05)
    experts.train()
    x = torch.randn(2, 5, 256, requires_grad=True)
    g = torch.randn(2, 5, 320)
    (lin(x) * g).sum().backward()
    assert torch.allclose(x.grad, g @ lin.dequantize(), rtol=1e-5, atol=1e-6)  # d/dx (x W^T . g) = g W

    xe = torch.randn(7, 256, requires_grad=True)
    xr = xe.detach().clone().requires_grad_(True)
    ge = torch.randn(7, 256)
    (experts.expert(2, xe) * ge).sum().backward()
    w1, w3, w2 = (getattr(experts, n).dequantize(2).t() for n in ("w1", "w3", "w2"))  # (D, F), (D, F), (F, D)
    ((F.silu(xr @ w1) * (xr @ w3)) @ w2 * ge).sum().backward()
    assert rel(xe.grad, xr.grad) < 1e-5
    assert lin.qweight.grad is None and not lin.qweight.requires_grad


@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_grads_equal_lora_on_dequantized_weights(base_ckpt, mode):
    model = qlora_model(base_ckpt, mode, random_b=True).train()
    twin = dequantized_twin(model).train()
    x = tokens(1)
    next_token_loss(model, x).backward()
    next_token_loss(twin, x).backward()
    ours, ref = dict(model.named_parameters()), dict(twin.named_parameters())
    names = [n for n in ours if n.endswith(("lora_A", "lora_B"))]
    assert len(names) == 2 * 28
    for n in names:
        assert ref[n].grad.norm() > 0, n
        assert rel(ours[n].grad, ref[n].grad) < 1e-5, n
    # layer 0's adapters get their gradient only through layers 1-3: frozen int4 linears and experts
    assert ours["layers.0.attention.wq.lora_A"].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in ours.items() if n not in names)
    assert all(not b.requires_grad and b.grad is None for b in model.buffers())


# --------------------------------------------------------------------------------------------------------
# 3. Training: the loss goes down, the base stays bit-identical; what the optimizer holds
# --------------------------------------------------------------------------------------------------------

def test_steps_lower_loss_and_keep_base_bit_identical(base_ckpt):
    model = qlora_model(base_ckpt, "int4").train()
    base = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.1)
    x = tokens(2, batch=2, length=17)
    losses = []
    for _ in range(8):
        loss = next_token_loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        final = next_token_loss(model, x).item()
    # ln(10240) = 9.23 at the start (a freshly initialized base is near uniform); adapters over every
    # projection memorize 32 tokens: the loss falls at every step, by more than 2 nats in 8 steps
    assert abs(losses[0] - math.log(ARGS.vocab_size)) < 0.2
    assert all(b < a for a, b in zip(losses, losses[1:] + [final])), losses + [final]
    assert final < losses[0] - 2.0, losses + [final]
    after = model.state_dict()
    assert [n for n in base if not torch.equal(after[n], base[n])] == []  # qweight, scale, norms, router, bias
    assert sum(n.endswith("qweight") for n in base) == 2 * 3 + 28  # experts' stacks + the adapted linears


def test_memory_adapters_only_and_int4_base(base_ckpt):
    """The QLoRA memory figures of the debug model, from its shapes (dim 256, 4 layers, 8 q heads and 2 kv
    heads of 32, dense layers 0 and 2 with hidden 1024, MoE layers 1 and 3 with 8 experts + a shared one of
    hidden 512, vocabulary 10240), rank 8 on every projection."""
    model = qlora_model(base_ckpt, "int4").train()
    # trainable: r * (in + out) per adapted linear
    attention = 8 * ((256 + 256) + (256 + 64) + (256 + 64) + (256 + 256))     # wq wk wv wo: 13312
    dense, shared = 8 * 3 * (256 + 1024), 8 * 3 * (256 + 512)                  # 30720, 18432
    trainable = 4 * attention + 2 * dense + 2 * shared
    assert trainable == 151_552
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    # base: quantized weights at 1/2 byte + a bf16 scale per group of 128; the rest stays fp32
    quantized = (4 * (2 * 256 * 256 + 2 * 64 * 256)        # attention: 655,360
                 + 2 * 3 * 256 * 1024 + 2 * 3 * 256 * 512  # dense + shared: 2,359,296
                 + 2 * 8 * 3 * 256 * 512)                  # routed experts: 6,291,456
    other = 2 * 10240 * 256 + (4 * 2 + 1) * 256 + 2 * 8 * 256 + 2 * 8  # embed + output, norms, routers, bias
    assert quantized == 9_306_112 and other == 5_249_296
    int4_bytes, fp32_bytes = quantized // 2 + quantized // 128 * 2 + 4 * other, 4 * (quantized + other)
    assert (int4_bytes, fp32_bytes) == (25_795_648, 58_221_632)  # 0.44x; the quantized part alone 0.129x
    base_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "lora_" not in n)
    assert base_bytes == int4_bytes
    # the optimizer: AdamW's two moments for the adapters only, 2 * 4 bytes * 151,552 = 1.2 MB
    # (the full model would need 2 * 4 * 14,555,408 = 116 MB)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    next_token_loss(model, tokens(3)).backward()
    opt.step()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert moments == 2 * 4 * trainable == 1_212_416


# --------------------------------------------------------------------------------------------------------
# 4. Merging: full-precision nn.Linear, same function; the merged model saves and loads
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_merged_copy_is_full_precision_and_same_function(base_ckpt, mode, tmp_path):
    model = qlora_model(base_ckpt, mode, random_b=True).eval()
    merged = lora.merged_copy(model)
    assert len(lora.lora_modules(model)) == 28  # the copy is merged, the model is not
    targeted = [m for n, m in merged.named_modules() if n.rsplit(".", 1)[-1] in TARGETS and ".experts." not in n]
    assert len(targeted) == 28 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in targeted)
    assert isinstance(merged.layers[1].feed_forward.experts, Q.QuantizedExperts)  # routed experts: as loaded
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    x = tokens(4)
    with torch.no_grad():
        y = model(x)
        assert (merged(x) - y).abs().max() < 1e-4
        assert (y - load_base(base_ckpt, mode)(x)).abs().max() > 1e-3  # the adapters do change the model
        # the merged model (quantized routed experts, full-precision linears) as a checkpoint that
        # checkpoint.load_model, hence generate.py, reads
        Q.save_quantized(merged, tmp_path / "merged")
        assert torch.equal(checkpoint.load_model(tmp_path / "merged")(x), merged(x))


# --------------------------------------------------------------------------------------------------------
# 5. Adapters alone, saved and loaded onto a freshly loaded quantized base
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_save_load_adapters_on_fresh_quantized_base(base_ckpt, mode, tmp_path):
    model = qlora_model(base_ckpt, mode, random_b=True).eval()
    lora.save_adapters(model, tmp_path / "ad", dict(rank=RANK, alpha=ALPHA, targets=TARGETS, base=str(base_ckpt)))
    cfg = json.loads((tmp_path / "ad" / lora.ADAPTER_CONFIG).read_text())
    assert cfg["quantize"] == mode and cfg.get("group_size") == (128 if mode == "int4" else None)
    fresh = load_base(base_ckpt, mode)
    assert lora.load_adapters(fresh, tmp_path / "ad")["quantize"] == mode
    ours, theirs = fresh.state_dict(), model.state_dict()
    assert sorted(ours) == sorted(theirs)  # same structure: <name>.base.qweight, .scale, lora_A, lora_B
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    x = tokens(5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    # the adapters file holds the adapters alone, in full precision
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "ad" / lora.ADAPTERS_FILE)
    assert len(saved) == 56 and all(t.dtype == torch.float32 for t in saved.values())


# --------------------------------------------------------------------------------------------------------
# 6. Errors a user can cause
# --------------------------------------------------------------------------------------------------------

def test_bad_quantize_options_are_refused_before_any_change(base_ckpt, tmp_path):
    model = checkpoint.load_model(base_ckpt, dtype=torch.float32)
    for kw, message in ((dict(quantize="int8"), "unknown quantize mode 'int8'"),
                        (dict(quantize="int4", group_size=96), "power of two"),
                        (dict(quantize="int4", group_size=512), "group size 512 does not divide the input "
                                                                 "dimension 256 of layers.0.attention.wq")):
        with pytest.raises(ValueError, match=message):
            lora.add_lora(model, RANK, ALPHA, ["wq", "w2"], **kw)
    assert type(model.layers[0].attention.wq) is nn.Linear and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="base is quantized to fp8"):
        lora.add_lora(load_base(base_ckpt, "fp8"), RANK, ALPHA, ["wq"], quantize="int4")
    # adapters trained over int4 refuse a base loaded as fp8; an unknown mode in the config is named
    lora.save_adapters(qlora_model(base_ckpt, "int4"), tmp_path / "ad", dict(rank=RANK, alpha=ALPHA, targets=TARGETS))
    with pytest.raises(ValueError, match="base is quantized to fp8"):
        lora.load_adapters(load_base(base_ckpt, "fp8"), tmp_path / "ad")
    cfg = tmp_path / "ad" / lora.ADAPTER_CONFIG
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "quantize": "int3"}))
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'"):
        lora.load_adapters(load_base(base_ckpt, "int4"), tmp_path / "ad")


# --------------------------------------------------------------------------------------------------------
# CUDA (run with `python -m pytest -m gpu tests/test_lora.py` on a GPU machine)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_cuda_qlora_step_matches_dequantized_fp32(base_ckpt, mode):
    """One QLoRA step on CUDA after a no-grad evaluation (train.py's order: int4 must not have been
    repacked into the fused kernel's layout by it, which the backward could not read), against the
    dequantized twin in fp32 on the CPU.

    Tolerances: fp32 with TF32 off on both sides differs only in summation order (~1e-7 relative per op,
    a few hundred ops deep), so 1e-4 leaves a 100x margin while a wrong backward (a transposed or missing
    term) is off by O(1). Under bf16 autocast (train.py on CUDA) each matmul rounds to 8 significant bits
    (2^-9 = 2e-3 relative) and ~20 of them lie between the loss and an adapter: errors of order 1e-2
    (worst 2.1e-2 int4, 2.6e-2 fp8 on an H200; 2e-2 with CPU autocast), so 5e-2, far below an O(1) mistake.
    Measured fp32 worst: 2e-6."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = qlora_model(base_ckpt, mode, random_b=True)
        twin = dequantized_twin(model).train()
        merged_on_cpu = lora.merged_copy(model)
        x = tokens(6)
        next_token_loss(twin, x).backward()
        ref = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}

        gpu = model.cuda().eval()
        with torch.no_grad():  # evaluation computes the same function as training: no FP8-rounded activations
            assert (gpu(x.cuda()).cpu() - twin.eval()(x)).abs().max() < 1e-4
        twin.train()
        quantized = [m for m in gpu.modules() if isinstance(m, Q.QuantizedLinear)]
        assert all(q.layout == "plain" and not q.fused for q in quantized)
        gpu.train()
        for dtype, tol in ((None, 1e-4), (torch.bfloat16, 5e-2)):
            gpu.zero_grad()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                next_token_loss(gpu, x.cuda()).backward()
            grads = {n: p.grad.float().cpu() for n, p in gpu.named_parameters() if p.grad is not None}
            assert sorted(grads) == sorted(ref)
            worst = max(rel(grads[n], ref[n]) for n in ref)
            print(f"{mode} {dtype}: worst relative gradient error {worst:.2e}")
            assert worst < tol, (dtype, worst)
        # merging on the GPU: dequantize + (alpha / r) B A, as on the CPU (the function itself is checked there)
        merged = dict(lora.merged_copy(gpu).named_parameters())
        for n, p in merged_on_cpu.named_parameters():
            assert torch.allclose(merged[n].cpu(), p, rtol=1e-5, atol=1e-7), n
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

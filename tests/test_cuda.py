"""The model on CUDA (run with `python -m pytest -m gpu` on a GPU machine; skipped elsewhere).

The CPU path is checked against transformers and Meta's reference in the parity tests; here the oracle is that
CPU path, in fp32 with TF32 switched off, so any difference comes from the CUDA kernels we reach: SDPA's
GPU backends with our chunk masks and left padding, the expert dispatch's index ops, the KV cache ring. bf16 is
compared against fp32 with a tolerance derived from bf16's 8-bit mantissa.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from generate import prefill
from model import FLAVORS, Transformer, init_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# the debug flavor with a short chunk, so a 100-token sequence crosses several chunk boundaries
ARGS = replace(FLAVORS["debug"], vision=None, attention_chunk_size=32)


@pytest.fixture(scope="module")
def models():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu = Transformer(ARGS)
    init_weights(cpu)
    cpu.eval()
    gpu = Transformer(ARGS).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def test_cuda_fp32_forward_equals_cpu(models):
    cpu, gpu = models
    tokens = torch.randint(0, ARGS.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(tokens)
        out = gpu(tokens.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cuda_left_padded_chunked_prefill_equals_cpu(models):
    """Rows of different lengths, left-padded, longer than the chunk: the mask path of SDPA on the GPU."""
    cpu, gpu = models
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist() for n in (90, 37, 1, 64)]
    with torch.no_grad():
        ref = prefill(cpu, cpu.make_cache(4, 96), prompts)
        out = prefill(gpu, gpu.make_cache(4, 96), prompts).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cuda_cached_decode_equals_full_forward(models):
    """Prefill 20 tokens, then decode one at a time across 3 chunk boundaries (32, 64, 96) on the GPU."""
    _, gpu = models
    tokens = torch.randint(0, ARGS.vocab_size, (1, 110), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        full = gpu(tokens)
        cache = gpu.make_cache(1, 110)
        steps = [gpu(tokens[:, :20], cache=cache)]
        steps += [gpu(tokens[:, t:t + 1], cache=cache) for t in range(20, 110)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cuda_training_step_gradients_equal_cpu(models):
    cpu, gpu = models
    tokens = torch.randint(0, ARGS.vocab_size, (2, 65), generator=torch.Generator().manual_seed(4))
    grads = []
    for model, t in ((cpu, tokens), (gpu, tokens.cuda())):
        model.train().zero_grad()
        logits = model(t[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), t[:, 1:].flatten()).backward()
        grads.append({n: p.grad.detach().cpu() for n, p in model.named_parameters()})
        model.eval()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_cuda_bf16_logits_close_to_fp32(models):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); through 4 layers the logits'
    relative error should stay within a few percent and the top-1 token mostly agree."""
    cpu, _ = models
    gpu16 = Transformer(ARGS).cuda().to(torch.bfloat16).eval()
    gpu16.load_state_dict(cpu.state_dict())
    tokens = torch.randint(0, ARGS.vocab_size, (2, 100), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = cpu(tokens)
        out = gpu16(tokens.cuda()).float().cpu()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel

"""Tests for generate.py: greedy decoding against transformers, sampling filters against hand-computed sets,
batching against decoding alone, the chat cache against a fresh prefill, and the CLI end to end."""

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import generate as gen  # noqa: E402
from model import ModelArgs, Transformer, init_weights  # noqa: E402
from tokenizer import DEBUG_TOKENIZER_PATH, Tokenizer  # noqa: E402

# Tiny, but with every Llama 4 feature on: chunked RoPE layers (chunk 16), a NoPE layer (3) with temperature
# tuning that kicks in at position 15, QK-norm, llama3-scaled RoPE with a smooth middle band, MoE layers 1 and 3.
TINY = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=1, moe_hidden_dim=64,
            ffn_hidden_dim=128, interleave_moe_layer_step=2, attention_chunk_size=16, floor_scale=16.0,
            rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=64))



@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY, vocab_size=10240, max_seq_len=256, image_token_id=8192 + 92))
    init_weights(model, std=0.1)  # larger than training's 0.02 so greedy choices are not near-ties
    return model.eval()


def random_prompt(n: int, seed: int, high: int = 8000) -> list[int]:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --------------------------------------------------------------------------------------------------------
# Greedy decoding == transformers' generate
# --------------------------------------------------------------------------------------------------------

def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        vocab_size=202048, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=16, floor_scale=16, attn_scale=0.1, use_qk_norm=True,
        max_position_embeddings=256, bos_token_id=200000, eos_token_id=None, pad_token_id=200018,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))
    hf = transformers.Llama4ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, 202048, (1, 40), generator=torch.Generator().manual_seed(1))  # crosses 3 chunks
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                             use_cache=True, eos_token_id=None, pad_token_id=200018)[0, 40:].tolist()
    model = checkpoint.load_model(tmp_path)
    ours = gen.generate(model, prompt.tolist(), 30, temperature=0)[0]
    assert len(theirs) == 30
    assert ours == theirs


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------

def draw(logits: list[float], n: int = 4000, seed: int = 0, **kw) -> torch.Tensor:
    rows = torch.tensor(logits).expand(n, -1)  # (n, V): n independent draws in one call
    return gen.sample(rows, generator=torch.Generator().manual_seed(seed), **kw)


def check_frequencies(ids: torch.Tensor, expected: dict[int, float], tol: float = 0.03) -> None:
    assert set(ids.tolist()) == set(expected), f"drew {sorted(set(ids.tolist()))}, allowed {sorted(expected)}"
    for token, p in expected.items():
        assert abs((ids == token).float().mean().item() - p) < tol, (token, p)


def test_top_k_draws_only_the_k_largest():
    logits = [2.0, 0.5, 3.0, -1.0, 1.0, 2.5, 0.0, -2.0]
    # By hand: the 3 largest are ids 2 (3.0), 5 (2.5), 0 (2.0); at temperature 0.5 their weights are e^(2x).
    weights = {2: math.exp(6.0), 5: math.exp(5.0), 0: math.exp(4.0)}
    total = sum(weights.values())
    ids = draw(logits, temperature=0.5, top_p=1.0, top_k=3)
    check_frequencies(ids, {t: w / total for t, w in weights.items()})


def test_top_p_draws_only_the_nucleus():
    probs = [0.05, 0.4, 0.1, 0.3, 0.15]
    logits = [math.log(p) for p in probs]
    # Sorted 0.4, 0.3, 0.15, 0.1, 0.05: mass above each is 0, 0.4, 0.7, 0.85, 0.95. With top_p 0.75 the first
    # three are kept (0.4 + 0.3 < 0.75 still), renormalized by 0.85.
    ids = draw(logits, temperature=1.0, top_p=0.75)
    check_frequencies(ids, {1: 0.4 / 0.85, 3: 0.3 / 0.85, 4: 0.15 / 0.85})
    # top_p 0.3: the most likely token alone already reaches it.
    assert set(draw(logits, n=500, temperature=1.0, top_p=0.3).tolist()) == {1}
    # top_k 2 first, then top_p 0.5 of the renormalized pair (0.4/0.7 = 0.57 >= 0.5): id 1 only.
    assert set(draw(logits, n=500, temperature=1.0, top_p=0.5, top_k=2).tolist()) == {1}


def test_greedy_is_argmax_and_sampling_is_reproducible(tiny_model):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    assert gen.sample(logits, temperature=0).tolist() == [int(r.argmax()) for r in logits]
    prompt = [random_prompt(12, seed=3)]

    def run(seed):
        return gen.generate(tiny_model, prompt, 25, temperature=1.0, top_p=0.95, top_k=500,
                            generator=torch.Generator().manual_seed(seed))[0]
    assert run(7) == run(7)
    assert run(7) != run(8)


# --------------------------------------------------------------------------------------------------------
# Batching, stopping, and the chat cache
# --------------------------------------------------------------------------------------------------------

def test_batched_greedy_equals_each_prompt_alone(tiny_model):
    prompts = [random_prompt(40, seed=1), random_prompt(7, seed=2), random_prompt(23, seed=3), [5]]
    alone = [gen.generate(tiny_model, [p], 20, temperature=0)[0] for p in prompts]
    assert gen.generate(tiny_model, prompts, 20, temperature=0) == alone
    # Each row stops at its own first stop id (kept in its result); the others run on unchanged.
    stop = alone[1][4]
    expected = [a[:a.index(stop) + 1] if stop in a else a for a in alone]
    assert expected[1] == alone[1][:alone[1].index(stop) + 1] and len(expected[1]) <= 5
    calls = []
    got = gen.generate(tiny_model, prompts, 20, temperature=0, stop_ids=[stop],
                       on_token=lambda row, t: calls.append((row, t)))
    assert got == expected
    assert [t for r, t in calls if r == 0] == expected[0]


def test_chat_cache_continues_like_a_fresh_prefill(tiny_model):
    turn1 = random_prompt(30, seed=4)
    cache = tiny_model.make_cache(1, 200)
    reply1 = gen.generate(tiny_model, [turn1], 10, temperature=0, cache=cache)[0]
    turn2 = [reply1[-1]] + random_prompt(25, seed=5)  # the last reply token was never fed
    reply2 = gen.generate(tiny_model, [turn2], 10, temperature=0, cache=cache)[0]
    history = turn1 + reply1[:-1] + turn2
    assert gen.generate(tiny_model, [history], 10, temperature=0)[0] == reply2
    assert int(cache.next_pos[0]) == len(history) + 9


# --------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------

def cli(*args: str, stdin: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--device", "cpu", *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = proc.communicate(stdin, timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def native_ckpt(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    tokenizer = tmp / "tokenizer.model"  # the name generate.py looks for in a checkpoint
    tokenizer.write_bytes(DEBUG_TOKENIZER_PATH.read_bytes())
    checkpoint.save_checkpoint(tiny_model, tmp / "tiny", tokenizer=tokenizer)
    return tmp / "tiny"


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t not in tok.stop_ids])


def test_cli_prints_exactly_the_generated_text(tiny_model, native_ckpt):
    tok = Tokenizer.from_file(DEBUG_TOKENIZER_PATH)
    ckpt = str(native_ckpt)
    greedy = cli("--ckpt", ckpt, "--prompt", "I love to", "--temperature", "0", "--max-new-tokens", "16")
    sampled = cli("--ckpt", ckpt, "--prompt", "Über café", "--seed", "3", "--max-new-tokens", "16")
    results = [finish(greedy), finish(sampled)]
    for rc, out, err in results:
        assert rc == 0, err
        assert "tok/s" in err and "tok/s" not in out

    ids = gen.generate(tiny_model, [tok.encode("I love to", bos=True)], 16, temperature=0, stop_ids=tok.stop_ids)[0]
    assert results[0][1] == text_of(tok, ids) + "\n"
    ids = gen.generate(tiny_model, [tok.encode("Über café", bos=True)], 16, temperature=0.6, top_p=0.9,
                       stop_ids=tok.stop_ids, generator=torch.Generator().manual_seed(3))[0]
    assert results[1][1] == text_of(tok, ids) + "\n"


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_cli_compile_prints_the_same_text(tiny_model, native_ckpt):
    """--compile: one compiled graph per decoded token (cpu_decode.CompiledSteps), the same greedy text."""
    tok = Tokenizer.from_file(DEBUG_TOKENIZER_PATH)
    rc, out, err = finish(cli("--ckpt", str(native_ckpt), "--prompt", "I love to", "--temperature", "0",
                              "--max-new-tokens", "16", "--compile"))
    assert rc == 0, err
    assert "compiling the decode step took" in err  # reported apart from the decode speed
    ids = gen.generate(tiny_model, [tok.encode("I love to", bos=True)], 16, temperature=0, stop_ids=tok.stop_ids)[0]
    assert out == text_of(tok, ids) + "\n"


def test_main_batch_and_chat(tiny_model, native_ckpt, capsys, monkeypatch):
    tok = Tokenizer.from_file(DEBUG_TOKENIZER_PATH)
    stops, ckpt = tok.stop_ids, str(native_ckpt)
    gen.main(["--ckpt", ckpt, "--device", "cpu", "--prompt", "Hello", "--prompt", "The capital of France is",
              "--temperature", "0", "--max-new-tokens", "12"])
    prompts = [tok.encode("Hello", bos=True), tok.encode("The capital of France is", bos=True)]
    a, b = [gen.generate(tiny_model, [p], 12, temperature=0, stop_ids=stops)[0] for p in prompts]
    assert capsys.readouterr().out == (f"=== completion 1/2 ===\n{text_of(tok, a)}\n"
                                       f"=== completion 2/2 ===\n{text_of(tok, b)}\n")

    # Interactive chat over two turns, the cache kept between them. Oracle: each turn prefilled from scratch
    # with the whole conversation in the chat format.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n\nWhat is 2 + 2?\n"))
    gen.main(["--ckpt", ckpt, "--device", "cpu", "--chat", "--system", "Be brief.", "--temperature", "0",
              "--max-new-tokens", "8"])
    history = tok.encode_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    r1 = gen.generate(tiny_model, [history], 8, temperature=0, stop_ids=stops)[0]
    closed = r1 if r1[-1] in stops else r1 + [tok.eot_id]
    history += closed + tok.encode_message("user", "What is 2 + 2?") + tok.encode_header("assistant")
    r2 = gen.generate(tiny_model, [history], 8, temperature=0, stop_ids=stops)[0]
    assert capsys.readouterr().out == text_of(tok, r1) + "\n" + text_of(tok, r2) + "\n"


def test_cli_errors_are_one_line(native_ckpt, tmp_path):
    ckpt = str(native_ckpt)
    cases = {  # what goes wrong -> a word the message must contain
        "missing": (["--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], "not found"),
        "empty": (["--ckpt", ckpt, "--prompt", "  "], "empty prompt"),
        "too long": (["--ckpt", ckpt, "--prompt", "hello " * 300], "context"),
    }
    procs = {name: cli(*args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        rc, out, err = finish(proc)
        assert rc != 0, name
        assert out == "", name
        assert err.startswith("error: ") and err.strip().count("\n") == 0, (name, err)
        assert cases[name][1] in err, (name, err)


def test_more_errors_are_clear(native_ckpt, tmp_path, capsys):
    no_tokenizer = tmp_path / "no-tok"
    no_tokenizer.mkdir()
    (no_tokenizer / "llama4.json").write_text("{}")
    ckpt = str(native_ckpt)
    cases = [  # the same CliError that the CLI prints as one line
        (["--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "300"], "context limit of 256"),
        (["--ckpt", ckpt, "--prompt", "hi", "--max-seq-len", "1000"], "model's context"),
        (["--ckpt", str(no_tokenizer), "--prompt", "hi"], "looked for"),
        (["--ckpt", ckpt, "--prompt", "hi", "--image", __file__], "needs a multimodal checkpoint"),
        (["--ckpt", ckpt, "--prompt", "hi"] + ["--image", __file__] * 6, "at most 5"),
        (["--ckpt", ckpt, "--prompt", "hi", "--image", str(tmp_path / "no.png")], "image not found"),
        (["--ckpt", ckpt, "--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["--ckpt", ckpt, "--prompt", "hi", "--system", "x"], "--chat"),
        (["--ckpt", ckpt], "nothing to generate"),
        (["--ckpt", ckpt, "--prompt", "hi", "--prompt", "ho", "--compile"], "single --prompt"),
        (["--ckpt", ckpt, "--prompt", "hi", "--compile", "--quantize", "int4"], "leave out --quantize"),
    ]
    for args, words in cases:
        with pytest.raises(gen.CliError, match=words):
            gen.main(args + ["--device", "cpu"])
    assert capsys.readouterr().out == ""


def test_compile_refuses_a_quantized_checkpoint_in_one_line(native_ckpt, tmp_path):
    """A checkpoint saved quantized (quantize.py) cannot go through the compiled step: the CLI says so."""
    from quantize import save_quantized

    save_quantized(checkpoint.load_model(native_ckpt, quantize="int4"), tmp_path / "q",
                   tokenizer=native_ckpt / "tokenizer.model")
    with pytest.raises(gen.CliError, match="compiled decoding needs every text weight plain"):
        gen.main(["--ckpt", str(tmp_path / "q"), "--device", "cpu", "--prompt", "hi", "--compile", "--max-new-tokens", "8"])


def test_help_reads_like_documentation(capsys):
    with pytest.raises(SystemExit) as e:
        gen.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("--ckpt", "--chat", "--top-p", "examples:", "python generate.py --ckpt", "stderr"):
        assert words in text

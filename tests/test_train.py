"""train.py, data.py and lora.py: learning, exact resume, chat loss masking, LoRA, MoE balancing, crash safety."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import data  # noqa: E402
import lora  # noqa: E402
import quantize  # noqa: E402
import train  # noqa: E402
from model import ModelArgs, Transformer, init_weights  # noqa: E402
from moe import MoE, update_expert_bias  # noqa: E402
from tokenizer import DEBUG_TOKENIZER_PATH, Tokenizer  # noqa: E402

VOCAB = 10240  # the debug tokenizer: 8192 BPE ranks + 2048 specials



@pytest.fixture(scope="module")
def tok():
    return Tokenizer.debug()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~150 KB of English prose that ships with CPython."""
    from pydoc_data.topics import topics
    path = tmp_path_factory.mktemp("data") / "pydoc.txt"
    path.write_text("\n\n".join(v for _, v in sorted(topics.items()))[:150_000])
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A fresh tiny model (a dense RoPE layer, then a MoE NoPE layer) saved with the debug tokenizer."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=VOCAB, n_experts=4,
                     moe_hidden_dim=64, ffn_hidden_dim=128, interleave_moe_layer_step=2, nope_layer_interval=2,
                     attention_chunk_size=32, rope_scaling=None, floor_scale=16.0, max_seq_len=512)
    model = Transformer(args)
    init_weights(model)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_checkpoint(model, path)
    shutil.copyfile(DEBUG_TOKENIZER_PATH, path / "tokenizer.model")
    return path


def tiny_flags(ckpt, data, out, *extra):
    return ["--init-from", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--seq-len", "64", "--lr", "3e-3", "--warmup-steps", "3", "--log-interval", "5", *map(str, extra)]


def run(flags):
    return train.train(train.parse_config([str(f) for f in flags]))


# --------------------------------------------------------------------------------------------------------

def test_short_run_learns_and_checkpoint_generates(tiny_ckpt, text_file, tmp_path, tok):
    out = tmp_path / "run"
    h = run(tiny_flags(tiny_ckpt, text_file, out, "--max-steps", 30, "--eval-interval", 15))
    start, end = h["val"][0][1], h["val"][-1][1]
    assert abs(start - math.log(VOCAB)) < 0.3  # a fresh model is close to uniform over the vocabulary
    assert start - end > 1.5, (start, end)  # a real fall (evaluation noise is ~0.05)

    # The checkpoint is the trained model: loading it reproduces the last held-out loss ...
    model = checkpoint.load_model(out)
    cfg = train.parse_config(tiny_flags(tiny_ckpt, text_file, out))
    held_out = data.TextData(tok, data.read_text_path(str(text_file)), cfg.seq_len, cfg.val_frac)
    val, loads = train.evaluate(model, held_out, cfg, torch.autocast("cpu", enabled=False), cfg.eval_batches)
    assert abs(val - h["val"][-1][1]) < 1e-5
    assert loads.shape == (1, 4) and loads.sum() > 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "routing.png").stat().st_size > 1000
    state = torch.load(out / train.TRAINER_FILE, weights_only=True)
    assert state["step"] == 30

    # ... and it generates with its own tokenizer.
    import generate
    found = Tokenizer.find(out)
    new = generate.generate(model, [found.encode("The", bos=True)], max_new_tokens=8, temperature=0.0)
    assert 1 <= len(new[0]) <= 8 and all(0 <= t < VOCAB for t in new[0])


def test_resume_matches_uninterrupted_run(tiny_ckpt, text_file, tmp_path):
    flags = ["--max-steps", 8, "--eval-interval", 4, "--warmup-steps", 2]
    straight = run(tiny_flags(tiny_ckpt, text_file, tmp_path / "a", *flags))
    first = run(tiny_flags(tiny_ckpt, text_file, tmp_path / "b", *flags, "--stop-after", 4))
    assert len(first["train"]) == 4
    resumed = run(["--out", str(tmp_path / "b"), "--resume"])
    assert len(resumed["train"]) == 8
    assert resumed["train"] == pytest.approx(straight["train"], abs=1e-6, rel=0)
    assert resumed["val"][-1][1] == pytest.approx(straight["val"][-1][1], abs=1e-6, rel=0)
    # the routing bias moved during training, identically in both runs
    a = checkpoint.load_model(tmp_path / "a").layers[1].feed_forward.expert_bias
    b = checkpoint.load_model(tmp_path / "b").layers[1].feed_forward.expert_bias
    assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-7)
    with pytest.raises(train.TrainError, match="lr"):  # a resume may not silently change the math
        train.parse_config(["--out", str(tmp_path / "b"), "--resume", "--lr", "1e-4"])


def test_unigram_entropy_by_hand():
    # frequencies 1/2, 1/4, 1/4: H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 nats
    assert data.unigram_entropy(torch.tensor([3, 3, 1, 7]), 10) == pytest.approx(1.5 * math.log(2), abs=1e-12)


def test_chat_loss_mask_by_hand(tok):
    # Debug vocabulary: specials start at 8192; offsets from Llama 4's list: <|begin_of_text|> 0,
    # <|header_start|> 5, <|header_end|> 6, <|eot|> 8.
    BOS, HS, HE, EOT = 8192, 8197, 8198, 8200
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
    e = tok.encode
    sys_part = [HS, *e("system"), HE, *e("\n\n"), *e("Be brief."), EOT]
    user1 = [HS, *e("user"), HE, *e("\n\n"), *e("Hi"), EOT]
    asst1_head, asst1_body = [HS, *e("assistant"), HE, *e("\n\n")], [*e("Hello there"), EOT]
    user2 = [HS, *e("user"), HE, *e("\n\n"), *e("Bye"), EOT]
    asst2_head, asst2_body = [HS, *e("assistant"), HE, *e("\n\n")], [*e("Bye!"), EOT]
    expected = [BOS] + sys_part + user1 + asst1_head + asst1_body + user2 + asst2_head + asst2_body

    ids, is_target = data.encode_conversation(tok, messages)
    assert ids == expected
    x, y = data.chat_example(ids, is_target, seq_len=1000)
    assert x.tolist() == expected[:-1]
    # Input position t predicts token t+1; it counts iff token t+1 is assistant content or its <|eot|>.
    a1 = 1 + len(sys_part) + len(user1) + len(asst1_head)  # index of the first assistant-1 token
    a2 = a1 + len(asst1_body) + len(user2) + len(asst2_head)
    counted = set(range(a1 - 1, a1 - 1 + len(asst1_body))) | set(range(a2 - 1, a2 - 1 + len(asst2_body)))
    assert {t for t in range(len(y)) if y[t] != data.IGNORE} == counted
    assert [int(y[t]) for t in sorted(counted)] == asst1_body + asst2_body
    assert y[a2 - 2] == data.IGNORE  # the "\n\n" of the second assistant header is a target of nothing

    _, y_cut = data.chat_example(ids, is_target, seq_len=a1 + 1)  # truncation keeps the mask aligned
    assert len(y_cut) == a1 + 1 and y_cut[a1 - 1] == expected[a1] and y_cut[a1] == expected[a1 + 1]


def test_data_cli_shows_which_tokens_count(text_file, tok, capsys):
    data.main(["--data", str(text_file), "--seq-len", "64"])
    out = capsys.readouterr().out
    assert "unigram entropy of the training tokens" in out
    counted = [line for line in out.splitlines() if line.endswith(" yes")]
    answer = [m["content"] for m in data.EXAMPLE_CHAT if m["role"] == "assistant"]
    assert len(answer) == 1 and len(counted) == len(tok.encode(answer[0])) + 1  # its tokens and its <|eot|>
    assert "'<|eot|>'" in counted[-1] and "'<|eot|>'" not in "".join(counted[:-1])


def write_chats(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_sft_and_lora_merge(tiny_ckpt, tmp_path, tok):
    chats = write_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "lora"
    h = run(["--init-from", str(tiny_ckpt), "--sft", str(chats), "--out", str(out), "--lora", 4,
             "--lora-targets", "wq,wv,w1", "--merge-lora", "--max-steps", 6, "--eval-interval", 6,
             "--batch-size", 4, "--seq-len", 64, "--lr", 1e-2])
    assert h["val"][-1][1] < h["val"][0][1]
    cfg = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert cfg["rank"] == 4 and cfg["targets"] == ["wq", "wv", "w1"]

    base = checkpoint.load_model(tiny_ckpt)
    adapted = checkpoint.load_model(tiny_ckpt)
    lora.load_adapters(adapted, out)
    assert any(m.lora_B.abs().sum() > 0 for m in lora.lora_modules(adapted).values())  # adapters trained
    merged = checkpoint.load_model(out)  # the merged model train.py wrote, as generate.py would read it
    x = torch.tensor([tok.encode("What is 3 plus 3?", bos=True)])
    with torch.no_grad():
        assert (adapted(x) - merged(x)).abs().max() < 1e-5
        assert (adapted(x) - base(x)).abs().max() > 1e-4  # and the adapters do change the model
    # the routing bias of the frozen base is not touched by LoRA training
    assert torch.equal(merged.layers[1].feed_forward.expert_bias, base.layers[1].feed_forward.expert_bias)


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory):
    """The debug flavor, freshly initialized: its projections' input dims (256, 1024) divide int4's groups of 128."""
    from dataclasses import replace

    from model import FLAVORS
    torch.manual_seed(0)
    model = Transformer(replace(FLAVORS["debug"], vision=None))
    init_weights(model)
    path = tmp_path_factory.mktemp("ckpt") / "debug"
    checkpoint.save_checkpoint(model, path, tokenizer=DEBUG_TOKENIZER_PATH)
    return path


def test_qlora_int4_learns_merges_and_resumes(debug_ckpt, tmp_path, tok):
    import generate
    from safetensors.torch import load_file
    flags = ["--init-from", debug_ckpt, "--sft", write_chats(tmp_path / "chats.jsonl"), "--lora", 4,
             "--lora-targets", "wq,wv,w1", "--quantize", "int4", "--merge-lora", "--max-steps", 6,
             "--eval-interval", 6, "--batch-size", 4, "--seq-len", 48, "--lr", 1e-2]
    out = tmp_path / "qlora"
    h = run(flags + ["--out", out])
    assert h["val"][-1][1] < h["val"][0][1] - 0.5, h["val"]  # from ~ln(10240) = 9.2 on a fresh model
    assert json.loads((out / lora.ADAPTER_CONFIG).read_text())["quantize"] == "int4"

    # The merged model is dequantize(W) + (alpha/r) B A: next to the full-precision base, each merged wq weight
    # is off by the int4 rounding alone: at most half a step, step = amax(|group of 128|) / 7 stored in bf16
    # (the format in quantize.py's docstring), and not zero.
    base = checkpoint.load_model(debug_ckpt)
    adapters = load_file(out / lora.ADAPTERS_FILE)
    merged = checkpoint.load_model(out)
    assert isinstance(merged.layers[1].feed_forward.experts, quantize.QuantizedExperts)  # experts stay int4
    # generate.py's loader (fused and packed for the CPU, experts still int4) computes the same
    for_cpu = generate.load(generate.parse_args(["--ckpt", str(out), "--prompt", "x", "--device", "cpu"]))
    assert isinstance(for_cpu.layers[1].feed_forward.experts, quantize.QuantizedExperts)
    w = base.layers[0].attention.wq.weight.detach()  # (512, 256)
    update = (16.0 / 4) * adapters["layers.0.attention.wq.lora_B"] @ adapters["layers.0.attention.wq.lora_A"]
    rounding = (merged.layers[0].attention.wq.weight - update - w).view(w.shape[0], -1, 128)
    step = (w.view(w.shape[0], -1, 128).abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
    assert (rounding.abs() <= step / 2 + 1e-6).all() and rounding.abs().max() > step.min() / 10
    assert update.abs().max() > 1e-3  # the adapters did train

    # ... and computes what the trained, unmerged QLoRA model computes: int4 base + full-precision adapters.
    adapted = checkpoint.load_model(debug_ckpt, dtype=torch.float32, quantize="int4")
    lora.load_adapters(adapted, out)
    x = torch.tensor([tok.encode("What is 3 plus 3?", bos=True)])
    with torch.no_grad():
        assert (adapted(x) - merged(x)).abs().max() < 1e-4
        assert (for_cpu(x) - merged(x)).abs().max() < 1e-4

    # Resuming re-quantizes the base from --init-from and loads the adapters: the same losses, step for step.
    run(flags + ["--out", tmp_path / "b", "--stop-after", 3])
    resumed = run(["--out", str(tmp_path / "b"), "--resume"])
    assert resumed["train"] == pytest.approx(h["train"], abs=1e-5, rel=0)


def test_quantize_needs_lora(tiny_ckpt):
    with pytest.raises(train.TrainError, match="--quantize int4 is QLoRA"):
        train.parse_config(["--init-from", str(tiny_ckpt), "--quantize", "int4"])


def test_lora_keeps_base_bit_identical(tiny_ckpt, tok):
    model = checkpoint.load_model(tiny_ckpt).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = lora.add_lora(model, rank=2, alpha=4.0, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    assert "layers.0.attention.wq" in names and "layers.1.feed_forward.shared_expert.w2" in names
    cfg = train.parse_config(["--init-from", str(tiny_ckpt), "--lora", "2", "--weight-decay", "0.5"])
    opt = train.configure_optimizer(model, cfg)
    x = torch.randint(0, 8192, (2, 16))
    for _ in range(3):
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    for n, p in before.items():
        assert torch.equal(after[n], p), n  # bit-identical, weight decay included
    assert all(m.lora_B.abs().sum() > 0 for m in lora.lora_modules(model).values())
    with torch.no_grad():  # merge: W + (alpha/r) B A gives the same function
        ref = model(x)
        assert (lora.merged_copy(model)(x) - ref).abs().max() < 1e-5


def test_balancing_bias_evens_a_skewed_router():
    torch.manual_seed(0)
    E, D = 4, 16
    layer = MoE(D, 32, E, 1).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with torch.no_grad():
        layer.router.weight[0] += 2.0 * u  # expert 0's logit is ~2 higher for inputs along u
    x = torch.randn(2048, D) * 0.3 + u

    def spread():  # busiest expert's share over the even share (1 = uniform, E = all to one)
        with torch.no_grad():
            layer(x)
        layer.tokens_per_expert.zero_()
        return train.imbalance(train.expert_counts([(0, layer)]))[0]

    skewed = spread()
    assert skewed > 3.0
    for _ in range(300):
        with torch.no_grad():
            layer(x)  # training mode: counts the load
        update_expert_bias(layer, coeff=0.01)
    assert spread() < 1.3 < skewed
    assert abs(float(layer.expert_bias.mean())) < 1e-6  # centered updates keep the bias at mean 0
    update_expert_bias(layer, coeff=0.0)  # coeff 0 (balancing off) changes nothing
    b = layer.expert_bias.clone()
    layer(x)
    update_expert_bias(layer, coeff=0.0)
    assert torch.equal(layer.expert_bias, b)


def test_nan_stops_and_keeps_last_checkpoint(tiny_ckpt, text_file, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real_lr = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: float("nan") if step >= 4 else real_lr(step, cfg))
    with pytest.raises(train.TrainError, match=r"loss is nan.*step 4"):
        run(tiny_flags(tiny_ckpt, text_file, out, "--max-steps", 10, "--eval-interval", 4))
    model = checkpoint.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(out / train.TRAINER_FILE, weights_only=True)["step"] == 4


def test_kill9_leaves_a_loadable_checkpoint(tiny_ckpt, text_file, tmp_path):
    """Kill -9 a trainer that checkpoints every step, at a random moment, three times over (resuming between)."""
    out, step = tmp_path / "killed", 0
    fresh = tiny_flags(tiny_ckpt, text_file, out, "--max-steps", 100000, "--eval-interval", 1, "--eval-batches", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(3):
        flags = fresh if attempt == 0 else ["--out", str(out), "--resume"]
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 60
            while not (out / train.TRAINER_FILE).exists() or saved_step(out) <= step:  # wait for a new save
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "no new checkpoint within 60 s"
                time.sleep(0.05)
            time.sleep(random.uniform(0.0, 1.0))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if sys.platform != "linux":  # elsewhere a kill between save_run's two renames needs this repair
            train.recover_run_dir(out)
        model = checkpoint.load_model(out)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert saved_step(out) > step
        step = saved_step(out)
    h = run(["--out", str(out), "--resume", "--max-steps", str(step + 1)])  # and the run goes on from there
    assert len(h["train"]) == step + 1


def saved_step(out):
    try:
        return torch.load(out / train.TRAINER_FILE, weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError, EOFError):  # the directory is being swapped right now
        return -1

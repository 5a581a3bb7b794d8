"""Tests for parallel.py: two CPU processes (gloo) run a tiny Maverick-like model cut by tensor parallelism, expert
parallelism and both, loaded from a Hugging Face checkpoint written by transformers and from Meta-style
model-parallel shards (as many as ranks, and fewer). Each must give the single-process logits (fp32, 1e-5), the
same greedy tokens through the KV cache, the same gradients and gradient norm, and hold the number of parameter
bytes worked out by hand from the config. And `torchrun train.py` on two processes trains exactly as one does."""
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import parallel  # noqa: E402
from model import ModelArgs, Transformer, init_weights  # noqa: E402

# Maverick's shape in miniature: MoE on odd layers (1, 3), dense on even ones, no QK-norm, no RoPE scaling,
# layer 3 NoPE; 4 experts, 4 heads, 2 kv heads. Hidden sizes follow Meta's rule for dim 64 (multiple_of 64):
# dense round_up(int(2*4*64/3), 64) = 192, experts round_up(int(170 / 2), 64) = 128, so the same weights can
# also be written as Meta shards.
V, D, L, H, HKV, HD, E, FE, FD = 512, 64, 4, 4, 2, 16, 4, 128, 192
N = 2  # processes
PROMPT_LEN, STEPS = 20, 8  # the prompt crosses the 16-token chunk; NoPE temperature starts at position 15

SCENARIOS = [  # name, checkpoint, tp, ep
    ("hf_tp", "hf", True, False), ("hf_ep", "hf", False, True), ("hf_both", "hf", True, True),
    ("meta2_tp", "meta2", True, False), ("meta2_ep", "meta2", False, True), ("meta2_both", "meta2", True, True),
    ("meta1_both", "meta1", True, True),
]


def prompt() -> torch.Tensor:
    return torch.randint(0, V, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def greedy_with_cache(model, tokens: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """Prefill, then one argmax token at a time through the KV cache; return the tokens and every logit row
    seen (prompt rows, then one per decoded token): (T + steps, V)."""
    cache = model.make_cache(1, tokens.shape[1] + steps)
    rows = [model(tokens, cache=cache)[0]]
    out = []
    for _ in range(steps):
        out.append(int(rows[-1][-1].argmax()))
        rows.append(model(torch.tensor([[out[-1]]]), cache=cache)[0])
    return out, torch.cat(rows)


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)[0]
    return F.cross_entropy(logits[:-1].float(), tokens[0, 1:])


# --------------------------------------------------------------------------------------------------------
# Checkpoints and the single-process reference
# --------------------------------------------------------------------------------------------------------

def meta_shards(sd: dict, M: int) -> list[dict]:
    """Write our weights the way Meta's release stores them, cut for M model-parallel ranks (llama4-facts.md)."""
    shards = [{} for _ in range(M)]

    def put(key, t, dim=None, parts=None):
        for r in range(M):
            piece = t if dim is None else t.chunk(M, dim)[r]
            shards[r][key] = (parts[r] if parts is not None else piece).contiguous().clone()

    put("tok_embeddings.weight", sd["tok_embeddings.weight"], 0)
    put("output.weight", sd["output.weight"], 0)
    put("norm.weight", sd["norm.weight"])
    for i in range(L):
        p, m = f"layers.{i}.", f"layers.{i}.feed_forward."
        q, k, v = (sd[p + f"attention.{w}.weight"].chunk(M, 0) for w in ("wq", "wk", "wv"))
        put(p + "attention.wqkv.weight", None, parts=[torch.cat([q[r], k[r], v[r]]) for r in range(M)])
        put(p + "attention.wo.weight", sd[p + "attention.wo.weight"], 1)
        put(p + "attention.wqkv.layer_norm_weight", sd[p + "attention_norm.weight"])
        if i % 2:  # MoE
            put(m + "norm.weight", sd[p + "ffn_norm.weight"])
            put(m + "router_DE", sd[m + "router.weight"].t())
            for meta, ours in (("moe_w_in_eD_F", "w1"), ("moe_w_swiglu_eD_F", "w3")):  # (E, D, F/M) -> (E*D, F/M)
                blocks = sd[m + "experts." + ours].chunk(M, 2)
                put(m + "experts." + meta, None, parts=[w.reshape(E * D, -1) for w in blocks])
            put(m + "experts.moe_w_out_eF_D", None, parts=[w.reshape(-1, D) for w in sd[m + "experts.w2"].chunk(M, 1)])
            put(m + "w_in_shared_FD.weight", sd[m + "shared_expert.w1.weight"], 0)
            put(m + "w_swiglu_FD.weight", sd[m + "shared_expert.w3.weight"], 0)
            put(m + "w_out_shared_DF.weight", sd[m + "shared_expert.w2.weight"], 1)
        else:
            w1, w3 = sd[m + "w1.weight"].chunk(M, 0), sd[m + "w3.weight"].chunk(M, 0)
            put(m + "mlp.fc1_weight", None, parts=[torch.cat([w1[r], w3[r]]) for r in range(M)])
            put(m + "mlp.fc2_weight", sd[m + "w2.weight"], 1)
            put(m + "mlp.layer_norm_weight", sd[p + "ffn_norm.weight"])
    return shards


META_PARAMS = dict(dim=D, n_layers=L, n_heads=H, n_kv_heads=HKV, vocab_size=V, norm_eps=1e-5, multiple_of=64,
                   ffn_exp=4.0, use_qk_norm=False, rope_theta=500000.0, nope_layer_interval=4,
                   attention_chunk_size=16, attn_temperature_tuning=True, floor_scale=16.0, attn_scale=0.1,
                   moe_args=dict(num_experts=E, top_k=1, interleave_moe_layer_step=2, capacity_factor=1.0,
                                 auto_scale_F=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import json
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FE, intermediate_size_mlp=FD, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=HKV, head_dim=HD, num_local_experts=E, num_experts_per_tok=1,
        interleave_moe_layer_step=2, use_qk_norm=False, attention_chunk_size=16, floor_scale=16, attn_scale=0.1,
        initializer_range=0.1, max_position_embeddings=256, bos_token_id=0, eos_token_id=None, pad_token_id=1)
    hf = transformers.Llama4ForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("parallel")
    hf.save_pretrained(root / "hf")
    # copied, not zero-copy views: the experts' w1/w3 would be strided halves of gate_up_proj, whose products
    # round differently (~1e-7) from the gathered model's contiguous ones that the tests compare with
    ref = checkpoint.load_model(root / "hf", dtype=torch.float32, zero_copy=False)
    sd = ref.state_dict()
    for M in (1, 2):
        d = root / f"meta{M}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(META_PARAMS))
        for r, shard in enumerate(meta_shards(sd, M)):
            torch.save(shard, d / f"consolidated.{r:02d}.pth")
    with torch.no_grad():
        hf_logits = hf(prompt()).logits[0]
    return dict(root=root, ref=ref, hf_logits=hf_logits)


# --------------------------------------------------------------------------------------------------------
# The two processes
# --------------------------------------------------------------------------------------------------------

def _worker(rank: int, root: str, init_file: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(N))  # what torchrun would set
    torch.set_num_threads(1)
    r, n, device = parallel.init_distributed(init_method=f"file://{init_file}")
    assert (r, n, device.type) == (rank, N, "cpu") and torch.distributed.get_backend() == "gloo"
    results = {"seed": torch.tensor(parallel.from_rank0(1000 + rank))}  # every rank gets rank 0's
    for name, ckpt, tp, ep in SCENARIOS:
        model = parallel.load_sharded(Path(root) / ckpt, rank, N, "cpu", torch.float32, tp=tp, ep=ep)
        tokens, logits = greedy_with_cache(model, prompt(), STEPS)
        res = dict(tokens=torch.tensor(tokens), logits=logits, param_bytes=torch.tensor(parallel.param_bytes(model)))
        if ckpt == "hf":
            loss_of(model, prompt()).backward()
            res["grads"] = {n_: p.grad for n_, p in model.named_parameters()}
            res["grad_norm"] = parallel.clip_grad_norm_(model, max_norm=1e9)
            full = parallel.full_state_dict(model)
            whole = parallel.gather_model(model)
            if rank == 0:
                res["full_state_dict"] = full
                res["gathered_logits"] = greedy_with_cache(whole, prompt(), STEPS)[1]
            else:
                assert full is None and whole is None
        results[name] = res
    torch.save(results, Path(root) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(world):
    import torch.multiprocessing as mp
    root = world["root"]
    init_file = tempfile.mktemp(dir=root)
    mp.spawn(_worker, args=(str(root), init_file), nprocs=N, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(N)]


# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------

def test_reference_is_transformers(world):
    """The single-process model we compare against is itself transformers' model (independent oracle)."""
    with torch.no_grad():
        ours = world["ref"](prompt())[0]
    assert (ours - world["hf_logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS])
def test_logits_and_greedy_tokens_equal_one_process(world, runs, name):
    ref_tokens, ref_logits = greedy_with_cache(world["ref"], prompt(), STEPS)
    top2 = ref_logits[PROMPT_LEN - 1:].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-ties: equal tokens are a real check
    for rank in range(N):
        res = runs[rank][name]
        assert res["tokens"].tolist() == ref_tokens, f"rank {rank}"
        assert (res["logits"] - ref_logits).abs().max() < 1e-5, f"rank {rank}"


def expected_param_bytes(tp: bool, ep: bool) -> int:
    """By hand from the config: what each of the N ranks holds, fp32."""
    replicated = 2 * V * D + D + L * 2 * D + 2 * E * D  # embeddings, lm_head, norms, the 2 routers
    attention = L * (2 * H * HD * D + 2 * HKV * HD * D)  # wq, wo; wk, wv
    dense = 2 * 3 * D * FD  # layers 0 and 2
    shared = 2 * 3 * D * FE  # layers 1 and 3
    experts = 2 * 3 * E * D * FE
    split = shared + experts + (attention + dense if tp else 0)  # experts: by hidden dim (tp) or whole (ep)
    whole = replicated + (0 if tp else attention + dense)
    if not (tp or ep):
        whole, split = whole + split, 0
    return 4 * (whole + split // N)


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS])
def test_each_rank_holds_its_share(world, runs, name):
    tp, ep = next((tp, ep) for n, _, tp, ep in SCENARIOS if n == name)
    assert parallel.param_bytes(world["ref"]) == expected_param_bytes(False, False)
    for rank in range(N):
        assert int(runs[rank][name]["param_bytes"]) == expected_param_bytes(tp, ep)
    # e.g. both: 1/2 of everything but 2*V*D + norms + routers
    assert expected_param_bytes(tp, ep) < 0.75 * expected_param_bytes(False, False)


@pytest.mark.parametrize("name", ["hf_tp", "hf_ep", "hf_both"])
def test_gradients_and_norm_equal_one_process(world, runs, name):
    ref = world["ref"]
    ref.zero_grad()
    loss_of(ref, prompt()).backward()
    plan = parallel.Plan(0, N, *next((tp, ep) for n, _, tp, ep in SCENARIOS if n == name))
    total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in ref.parameters()))
    for ref_name, p in ref.named_parameters():
        blocks = [runs[r][name]["grads"][ref_name] for r in range(N)]
        d = plan.shard_dim(ref_name)
        if d is None:  # replicated: every rank has the whole, same gradient
            for g in blocks:
                assert (g - p.grad).abs().max() < 1e-5, ref_name
        else:
            assert (torch.cat(blocks, d) - p.grad).abs().max() < 1e-5, ref_name
    for r in range(N):
        assert abs(float(runs[r][name]["grad_norm"]) - total) < 1e-4 * total


@pytest.mark.parametrize("name", ["hf_tp", "hf_ep", "hf_both"])
def test_full_state_dict_and_gather_model_reassemble_the_model(world, runs, name):
    full = runs[0][name]["full_state_dict"]
    ref = world["ref"].state_dict()
    assert set(full) == set(ref)
    for k, t in ref.items():
        assert torch.equal(full[k], t), k
    _, ref_logits = greedy_with_cache(world["ref"], prompt(), STEPS)
    assert (runs[0][name]["gathered_logits"] - ref_logits).abs().max() < 1e-6  # the uncut model, same weights


def test_from_rank0_gives_every_rank_the_same_value(runs):
    assert [int(runs[r]["seed"]) for r in range(N)] == [1000] * N


def test_indivisible_sizes_are_clear_errors():
    args = ModelArgs(dim=D, n_layers=2, n_heads=H, n_kv_heads=HKV, head_dim=HD, vocab_size=V, n_experts=E,
                     moe_hidden_dim=FE, ffn_hidden_dim=FD, interleave_moe_layer_step=2)
    with pytest.raises(ValueError, match=r"n_kv_heads = 2 does not split over 4 ranks"):
        parallel.check_plan(args, parallel.Plan(0, 4, tp=True, ep=False))
    with pytest.raises(ValueError, match=r"n_experts = 4 does not split over 3 ranks"):
        parallel.check_plan(args, parallel.Plan(0, 3, tp=False, ep=True))
    parallel.check_plan(args, parallel.Plan(0, 4, tp=False, ep=True))  # 4 experts on 4 ranks is fine
    with pytest.raises(checkpoint.CheckpointError, match=r"layers.0.attention.wq.weight: shape \(6, 64\)"):
        parallel.Plan(0, 4).narrow("layers.0.attention.wq.weight", torch.zeros(6, D))


def test_one_process_is_untouched(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.init_distributed()[:2] == (0, 1)  # no torchrun: a world of one, nothing initialized
    assert not torch.distributed.is_initialized()
    args = ModelArgs(dim=D, n_layers=2, n_heads=H, n_kv_heads=HKV, head_dim=HD, vocab_size=V, n_experts=E,
                     moe_hidden_dim=FE, ffn_hidden_dim=FD, interleave_moe_layer_step=2)
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    parallel.parallelize(model, parallel.Plan(0, 1))
    assert {n: p.shape for n, p in model.named_parameters()} == shapes


# --------------------------------------------------------------------------------------------------------
# train.py under torchrun: two ranks train one cut model (TP + EP) exactly as one process does
# --------------------------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--max-steps", "4", "--eval-interval", "4", "--eval-batches", "1", "--batch-size", "2",
               "--seq-len", "32", "--log-interval", "1", "--warmup-steps", "1"]


def train_history(out: Path) -> dict:
    return json.loads(torch.load(out / "trainer.pt", weights_only=True)["history"])


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """A text file, chat conversations, and a tiny Maverick-like checkpoint with the debug vocabulary."""
    from pydoc_data.topics import topics

    from tokenizer import DEBUG_TOKENIZER_PATH
    root = tmp_path_factory.mktemp("train")
    (root / "text.txt").write_text("\n\n".join(v for _, v in sorted(topics.items()))[:60_000])
    rows = [{"messages": [{"role": "user", "content": f"What is {i} times 3?"},
                          {"role": "assistant", "content": f"{i} times 3 is {3 * i}."}]} for i in range(40)]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    torch.manual_seed(1)
    args = ModelArgs(dim=D, n_layers=L, n_heads=H, n_kv_heads=HKV, head_dim=HD, vocab_size=10240, n_experts=E,
                     moe_hidden_dim=FE, ffn_hidden_dim=FD, interleave_moe_layer_step=2, use_qk_norm=False,
                     rope_scaling=None, attention_chunk_size=16, floor_scale=16.0, max_seq_len=256)
    model = Transformer(args)
    init_weights(model)
    checkpoint.save_checkpoint(model, root / "maverick_like", tokenizer=DEBUG_TOKENIZER_PATH)
    return root


TRAIN_CASES = {  # what to train: the debug flavor from scratch; a checkpoint fine-tuned on conversations
    "scratch": lambda root: ["--debug", "--data", root / "text.txt"],
    "init_from": lambda root: ["--init-from", root / "maverick_like", "--sft", root / "chats.jsonl"],
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_torchrun_training_equals_one_process(train_inputs, tmp_path, case, capsys):
    """Per-step losses and gradient norms (the global norm across shards), the balancing biases and the
    saved checkpoint's logits of `torchrun --nproc-per-node 2 train.py` equal one process's. Adam divides each
    gradient entry by its own size, so entries that are ~0 by cancellation (whose value depends on the
    summation order) move by up to a fraction of lr either way: even one process on 1 vs 2 threads differs
    by ~4e-5 in these logits after a step at lr 1e-3. At lr 1e-4 that floor is ~3e-6, under the 1e-5 bound."""
    import train
    flags = [str(f) for f in TRAIN_CASES[case](train_inputs) + TRAIN_FLAGS + ["--lr", "1e-4"]]
    one = train.train(train.parse_config(flags + ["--out", str(tmp_path / "one")]))
    one_norms = [float(n) for n in re.findall(r"\| grad ([\d.]+) \|", capsys.readouterr().out)]  # as logged
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(N),
                           str(ROOT / "train.py"), *flags, "--out", str(tmp_path / "two")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval step 0:") == 1 and "cut over 2 ranks" in proc.stdout  # rank 0 alone prints

    two = train_history(tmp_path / "two")
    assert one["train"][-1] < one["train"][0] - 0.01  # it trained
    assert len(two["train"]) == 4 and max(abs(a - b) for a, b in zip(one["train"], two["train"])) < 1e-5
    assert max(abs(a[1] - b[1]) for a, b in zip(one["val"], two["val"])) < 1e-5
    norms = [float(n) for n in re.findall(r"\| grad ([\d.]+) \|", proc.stdout)]
    assert len(norms) == 4 and norms == pytest.approx(one_norms, abs=0.011)  # 2 decimals

    a, b = checkpoint.load_model(tmp_path / "one"), checkpoint.load_model(tmp_path / "two")
    for i in (1, 3):  # the MoE layers' balancing biases moved, identically: same global expert counts
        bias = a.layers[i].feed_forward.expert_bias
        assert bias.abs().sum() > 0 and torch.equal(bias, b.layers[i].feed_forward.expert_bias)
    x = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() < 1e-5

    # The optimizer state stayed cut over the ranks, so the run cannot be resumed: a clear error.
    with pytest.raises(train.TrainError, match="trained by 2 ranks under torchrun"):
        train.parse_config(["--out", str(tmp_path / "two"), "--resume"])


def test_torchrun_refuses_resume_and_lora(train_inputs, monkeypatch):
    import train
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train.TrainError, match="--resume needs one process"):
        train.parse_config(["--out", str(train_inputs / "nothing"), "--resume"])
    with pytest.raises(train.TrainError, match="--lora needs one process"):
        train.parse_config(["--init-from", str(train_inputs / "maverick_like"), "--lora", "4"])

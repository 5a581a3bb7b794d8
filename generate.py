"""Text generation with Llama 4: prefill the prompt, then decode one token at a time from a KV cache.

The loop is the classic one (modeled on gpt-fast's generate.py): one forward over the whole prompt fills the
cache and gives the logits of the first new token ("prefill"); after that each step feeds the token just
chosen and reads the next one's logits ("decode"). What is particular to Llama 4 here:

1. The cache is not one big tensor per layer: RoPE layers attend only inside chunks of 8192 tokens, so
   `model.make_cache` gives them a ring of one chunk, and only the NoPE layers (every 4th) keep everything.
   Prompts longer than a chunk are still prefilled in a single forward.
2. Generation stops on any of three tokens: `<|end_of_text|>`, `<|eom|>` (end of message: a tool call waits
   for its result) and `<|eot|>` (end of turn). The models ship with temperature 0.6 and top-p 0.9.
3. Chat uses Llama 4's own format, `<|header_start|>ROLE<|header_end|>\\n\\n ... <|eot|>` (tokenizer.py).
   In the interactive chat the KV cache lives across turns, so each turn only prefills its new tokens.

Batches are left-padded: padding gets position -1, which the model never attends to, and every row keeps its
own positions 0, 1, 2, ... so a prompt decodes the same alone or in a batch. Each row stops on its own.

    python generate.py --ckpt DIR --prompt "I love to"
    python generate.py --ckpt DIR --chat                     # interactive, one line per turn
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from cpu_decode import CompileError
from tokenizer import StreamDecoder, Tokenizer

MAX_IMAGES = 5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHAT_CONTEXT = 8192  # KV cache size of the interactive chat unless --max-seq-len says otherwise


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------

def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the nucleus: the most likely tokens whose total probability first reaches top_p; renormalize.

    A token is kept when the probability of the tokens ranked above it is still below top_p, so the most
    likely token is always kept. probs (B, V) -> (B, V).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)   # (B, V)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs      # (B, V) probability ranked above each token
    sorted_probs = sorted_probs.masked_fill(mass_above >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, temperature: float = 0.6, top_p: float = 0.9, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row: logits (B, V) -> ids (B,).

    temperature 0 is greedy (argmax). Otherwise: divide by the temperature, keep the top_k largest logits
    (ties with the k-th are kept too), softmax, keep the top-p nucleus, draw one token with `generator`.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature                        # (B, V)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)                        # (B, V)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------------
# Prefill and decode
# --------------------------------------------------------------------------------------------------------

def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    return time.perf_counter()


def prefill(model, cache, prompt_tokens: Sequence[Sequence[int]], pad_id: int = 0,
            image_features: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompts through the model in one forward, filling `cache`; return next-token logits (B, V).

    Rows are left-padded to the longest; the padding gets position -1 (invisible to attention) and each
    row's tokens continue from its own cache.next_pos (0 for a fresh cache, the conversation so far in chat).
    image_features (n, dim) replace the prompts' n `<|patch|>` embeddings, in order (early fusion).
    """
    device = cache.next_pos.device
    B, T = len(prompt_tokens), max(len(p) for p in prompt_tokens)
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)      # (B, T)
    positions = torch.full((B, T), -1, dtype=torch.long, device=device)       # (B, T)
    for row, ids in enumerate(prompt_tokens):
        n = len(ids)
        tokens[row, T - n:] = torch.tensor(ids, dtype=torch.long, device=device)
        positions[row, T - n:] = cache.next_pos[row] + torch.arange(n, device=device)
    return model(tokens, cache=cache, positions=positions, image_features=image_features,
                 last_only=True)[:, -1]  # (B, V)


@torch.no_grad()
def generate(model, prompt_tokens: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.6,
             top_p: float = 0.9, top_k: int | None = None, stop_ids: Sequence[int] = (),
             generator: torch.Generator | None = None, on_token: Callable[[int, int], None] | None = None,
             cache=None, stats: dict | None = None,
             image_features: torch.Tensor | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; return the new ids per row.

    A row ends at its first stop id, which is included in its result (so a result that does not end in a
    stop id ran out of max_new_tokens). on_token(row, id) is called for every new token as it is chosen.
    `cache`: continue a conversation whose earlier tokens are already in this cache (the last token
    returned by the previous call was never fed: put it at the start of the next prompt). Without one, a
    fresh cache just big enough is made. `stats`, if given, receives token counts and timings.
    `image_features` (from model.encode_images) fill the prompts' `<|patch|>` tokens.
    """
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B = len(prompt_tokens)
    device = model.tok_embeddings.weight.device
    if cache is None:
        cache = model.make_cache(B, max(len(p) for p in prompt_tokens) + max_new_tokens)
    stop = set(int(s) for s in stop_ids)

    compiled = getattr(model, "decode_step", None)  # cpu_decode.CompiledSteps: its first step compiles
    compiling = compiled.compile_s if compiled is not None else 0.0
    t0 = _clock(device)
    logits = prefill(model, cache, prompt_tokens, image_features=image_features)  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    t1 = None
    for step in range(max_new_tokens):
        next_ids = sample(logits, temperature, top_p, top_k, generator)  # (B,)
        if step == 0:
            t1 = _clock(device)  # prefill done (its time includes choosing the first token)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
            done[row] = token in stop
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep being fed (their outputs are ignored) so the batch stays rectangular.
        logits = model(next_ids[:, None], cache=cache, last_only=True)[:, -1]  # (B, V)
    t2 = _clock(device)
    if stats is not None:
        compile_s = compiled.compile_s - compiling if compiled is not None else 0.0  # if this call compiled
        stats.update(prefill_tokens=sum(len(p) for p in prompt_tokens), prefill_s=t1 - t0,
                     decode_tokens=sum(len(o) for o in out) - B, decode_steps=max(len(o) for o in out) - 1,
                     decode_s=t2 - t1 - compile_s, compile_s=compile_s)
    return out


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  python generate.py --ckpt ~/models/Llama-4-Scout-17B-16E --prompt "I love to"
  python generate.py --ckpt DIR --prompt "The capital of France is" --temperature 0 --max-new-tokens 20
  python generate.py --ckpt DIR --chat --system "Answer briefly." --prompt "Why is the sky blue?"
  python generate.py --ckpt DIR --chat            # interactive: one line per turn; /reset, /exit
  python generate.py --ckpt DIR --prompt-file prompts.txt --temperature 0   # one prompt per line, batched
  python generate.py --ckpt DIR --prompt "Hi" --seed 1 --top-k 50          # same seed -> same text

output:
  stdout carries only the generated text, streamed as it is decoded (a multi-byte character is never cut)
  and ended by a newline; with several prompts, each completion follows a '=== completion i/n ===' line.
  Timings (prefill and decode tokens/s) and peak memory go to stderr. Generation stops at <|end_of_text|>,
  <|eom|> or <|eot|> (not printed) or after --max-new-tokens.

checkpoints:
  --ckpt takes a Hugging Face snapshot (config.json + *.safetensors), Meta's release (params.json +
  consolidated.NN.pth) or a directory written by checkpoint.save_checkpoint. The tokenizer is looked for in
  it (tokenizer.model, original/tokenizer.model, tokenizer.json, original/tokenizer.json) unless
  --tokenizer is given.
"""


class CliError(Exception):
    """A problem with the command line or its inputs: printed as one line, exit code 1."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="generate.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Generate text with a Llama 4 checkpoint: prefill the prompt in one forward, then decode "
                    "token by token from a KV cache (chunked for RoPE layers, full for NoPE layers), "
                    "streaming the text to stdout.")
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint directory (HF, Meta or native)")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model / tokenizer.json, or a directory holding one (default: --ckpt)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--quantize", choices=["int4", "fp8"], help="quantize the experts' weights while loading")
    g.add_argument("--compile", action="store_true",
                   help="on the CPU, decode through one compiled graph per token (torch.compile): ~2x the "
                        "tokens/s of the default; a single prompt or chat only, unquantized weights; compiling "
                        "takes 10-30 s at the first token and needs a C++ compiler")
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text to continue; repeat for a batch")
    g.add_argument("--prompt-file", metavar="FILE", help="more prompts, one per line (blank lines skipped)")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the Llama 4 chat format; without --prompt, "
                        "chat interactively (one stdin line per turn, the KV cache kept between turns)")
    g.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help=f"an image for the (single) prompt or the first chat turn: tiled, encoded by the "
                        f"checkpoint's vision encoder and fused into the prompt (repeatable, up to {MAX_IMAGES})")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most new tokens per prompt (256)")
    g.add_argument("--temperature", type=float, default=0.6, metavar="T", help="0 = greedy (default 0.6, as the models ship)")
    g.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass, 1 = off (default 0.9)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the k most likely tokens only (off)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="random seed: same seed, same text (default: random)")
    g.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="context limit in tokens, prompt + new tokens (default and ceiling: the model's); "
                        f"also the KV cache size of the interactive chat (default {CHAT_CONTEXT})")
    return p.parse_args(argv)


def check_flags(a: argparse.Namespace) -> None:
    """Flag values that make no sense, before anything slow happens."""
    if a.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.top_k is not None and a.top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {a.top_k}")
    if a.max_seq_len is not None and a.max_seq_len < 2:
        raise CliError(f"--max-seq-len must be >= 2, got {a.max_seq_len}")
    if a.system is not None and not a.chat:
        raise CliError("--system needs --chat")
    if len(a.image) > MAX_IMAGES:
        raise CliError(f"at most {MAX_IMAGES} images per prompt, got {len(a.image)}")
    for path in a.image:
        if not Path(path).is_file():
            raise CliError(f"image not found: {path}")
    if a.image and len(a.prompt) + bool(a.prompt_file) > 1:
        raise CliError("--image goes with a single --prompt (or the first turn of --chat)")
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise CliError(f"unknown --device {a.device!r} (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda, but CUDA is not available here (use --device cpu)")
    if not Path(a.ckpt).is_dir():
        raise CliError(f"checkpoint directory not found: {a.ckpt}")
    if a.compile:
        if device.type != "cpu":
            raise CliError("--compile is for --device cpu (the compiled step is built and measured for the CPU only)")
        if a.quantize:
            raise CliError("--compile decodes unquantized weights: leave out --quantize")
        if len(a.prompt) > 1 or a.prompt_file:
            raise CliError("--compile decodes one sequence at a time: give a single --prompt (or --chat)")


def load_tokenizer(a: argparse.Namespace) -> Tokenizer:
    try:
        return Tokenizer.find(a.tokenizer or a.ckpt)  # a file, or a directory to look in
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def read_prompts(a: argparse.Namespace) -> list[str]:
    prompts = list(a.prompt)
    if a.prompt_file:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                lines = [line.rstrip("\r\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"cannot read --prompt-file {a.prompt_file}: {e}") from None
        file_prompts = [line for line in lines if line.strip()]
        if not file_prompts:
            raise CliError(f"--prompt-file {a.prompt_file} has no prompts (all lines are blank)")
        prompts += file_prompts
    for i, text in enumerate(prompts):
        if not text.strip():
            raise CliError("empty prompt" + (f" (prompt {i + 1})" if len(prompts) > 1 else ""))
    if not prompts and not a.chat:
        raise CliError("nothing to generate from: give --prompt TEXT, --prompt-file FILE, or --chat")
    return prompts


def load_images(a: argparse.Namespace, tok: Tokenizer) -> tuple[torch.Tensor | None, list[list[int]]]:
    """Tile every --image (vision.preprocess) and lay out its tokens; -> (pixels (N, 3, 336, 336), token lists)."""
    if not a.image:
        return None, []
    import checkpoint
    import vision
    try:
        args = checkpoint.load_args(a.ckpt, vision=True)
    except checkpoint.CheckpointError as e:
        raise CliError(f"--image needs a multimodal checkpoint: {e}") from None
    ids = dict(image_start=tok.image_start_id, image_end=tok.image_end_id, image=tok.image_id,
               patch=tok.patch_id, tile_x_separator=tok.tile_x_separator_id,
               tile_y_separator=tok.tile_y_separator_id)
    pixels, layouts = [], []
    for path in a.image:
        try:
            tiles, grid = vision.preprocess(vision.load_image(path), tile=args.vision.image_size)
        except vision.ImageError as e:
            raise CliError(str(e)) from None
        pixels.append(tiles)
        layouts.append(vision.image_token_layout(grid, args.vision.patches_per_tile, **ids))
    return torch.cat(pixels), layouts


def encode_prompt(tok: Tokenizer, text: str, a: argparse.Namespace, images: Sequence[list[int]] = ()) -> list[int]:
    """A raw prompt starts with <|begin_of_text|>; a chat prompt is a dialog ending in an assistant header.
    Image token layouts go before the text, as in Meta's chat format."""
    if not a.chat:
        return [tok.bos_id] + [t for ids in images for t in ids] + tok.encode(text)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    content = [*images, text] if images else text
    return tok.encode_dialog(messages + [{"role": "user", "content": content}])


def context_limit(a: argparse.Namespace, model_max: int) -> int:
    if a.max_seq_len is not None and a.max_seq_len > model_max:
        raise CliError(f"--max-seq-len {a.max_seq_len} is more than the model's context ({model_max} tokens)")
    return a.max_seq_len or model_max


def check_lengths(prompts: list[list[int]], max_new_tokens: int, limit: int) -> None:
    for i, ids in enumerate(prompts):
        which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
        if len(ids) + max_new_tokens > limit:
            raise CliError(f"{which} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that is "
                           f"{len(ids) + max_new_tokens} > the context limit of {limit} tokens")


def distributed() -> bool:
    """Started by torchrun with several processes: the model is cut across them (parallel.py)."""
    import parallel
    return parallel.torchrun_world() > 1


def load(a: argparse.Namespace):
    """The model in --ckpt, on --device in --dtype; checkpoint errors become one-line CliErrors.
    Under torchrun each process loads only its share, onto its own device (a.device is updated)."""
    import checkpoint
    if distributed():
        import parallel
        if a.quantize or a.compile:
            raise CliError(f"--{'quantize' if a.quantize else 'compile'} is not supported with several processes yet")
        _, _, device = parallel.init_distributed()
        a.device = str(device)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if torch.device(a.device).type == "cuda"
                                             else torch.float32)
    try:
        if distributed():
            return parallel.load_model_for_rank(a.ckpt, dtype=dtype, vision=bool(a.image))
        # On the CPU the weight products are fused and packed for oneDNN (cpu_decode.py; bench/decode.py)
        return checkpoint.load_model(a.ckpt, device=a.device, dtype=dtype, quantize=a.quantize,
                                     vision=bool(a.image), for_decode=torch.device(a.device).type == "cpu",
                                     compile=a.compile)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:  # checkpoint.CheckpointError is a ValueError
        raise CliError(f"cannot load {a.ckpt}: {e}") from None
    except ImportError as e:  # --quantize needs quantize.py
        raise CliError(f"--quantize {a.quantize} is not available: {e}") from None


def model_context(a: argparse.Namespace) -> int:
    """The checkpoint's claimed context, read from its config without loading the weights."""
    import checkpoint
    try:
        return checkpoint.load_args(a.ckpt).max_seq_len
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
        raise CliError(f"cannot load {a.ckpt}: {e}") from None


def make_generator(a: argparse.Namespace) -> tuple[torch.Generator, int]:
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    if distributed():  # every process must draw the same tokens from its (identical) logits
        import parallel
        seed = parallel.from_rank0(seed)
    gen = torch.Generator(device=a.device)
    gen.manual_seed(seed)
    return gen, seed


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return f"{rss_bytes / 2**30:.2f} GiB peak RSS"


def report(stats: dict, device: torch.device, seed: int | None) -> None:
    """One stderr line: prefill and decode throughput, peak memory (and the seed if sampling)."""
    pre = stats["prefill_tokens"] / max(stats["prefill_s"], 1e-9)
    dec = stats["decode_tokens"] / max(stats["decode_s"], 1e-9)
    line = (f"prefill {stats['prefill_tokens']} tokens in {stats['prefill_s']:.2f} s ({pre:.1f} tok/s) | "
            f"decode {stats['decode_tokens']} tokens in {stats['decode_s']:.2f} s ({dec:.1f} tok/s) | "
            f"{peak_memory(device)}")
    if stats.get("compile_s"):
        line += f" | compiling the decode step took {stats['compile_s']:.1f} s (not counted above)"
    if seed is not None:
        line += f" | seed {seed}"
    print(line, file=sys.stderr, flush=True)


def printer(tok: Tokenizer, stop_ids: Sequence[int]):
    """An on_token callback that streams one row's text to stdout, and a function that ends the stream."""
    stream = StreamDecoder(tok)

    def on_token(row: int, token: int) -> None:
        if token not in stop_ids:
            sys.stdout.write(stream.feed(token))
            sys.stdout.flush()

    def finish() -> None:
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
    return on_token, finish


def completion_text(tok: Tokenizer, ids: list[int], stop_ids: Sequence[int]) -> str:
    """The text of one result, without its stop token."""
    return tok.decode([t for t in ids if t not in stop_ids])


def run_prompts(model, tok: Tokenizer, prompts: list[list[int]], a, generator, seed, image_features=None) -> None:
    """Generate for every prompt at once: stream a single prompt, print a batch when it is done."""
    stop_ids = tok.stop_ids
    stats: dict = {}
    common = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                  stop_ids=stop_ids, generator=generator, stats=stats, image_features=image_features)
    if len(prompts) == 1:
        on_token, finish = printer(tok, stop_ids)
        generate(model, prompts, on_token=on_token, **common)
        finish()
    else:
        results = generate(model, prompts, **common)
        for i, ids in enumerate(results):
            sys.stdout.write(f"=== completion {i + 1}/{len(results)} ===\n{completion_text(tok, ids, stop_ids)}\n")
        sys.stdout.flush()
    report(stats, torch.device(a.device), seed)


def chat_loop(model, tok: Tokenizer, a, generator, seed, context: int, images=(), image_features=None) -> None:
    """Interactive chat: each stdin line is a user turn; the KV cache carries the conversation.

    Only the new turn is prefilled: the previous reply's last token (never fed yet), the user message and
    the assistant header. `/reset` starts over, `/exit` (or end of input) quits. Images (--image) go into the
    first user turn.
    """
    stop_ids = tok.stop_ids
    interactive = sys.stdin.isatty()
    start = [tok.bos_id] + (tok.encode_message("system", a.system) if a.system else [])

    def fresh():
        return model.make_cache(1, context), list(start)
    cache, pending = fresh()
    if interactive:
        print(f"chat with a {context}-token context; /reset starts over, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        if distributed():  # only rank 0 reads the keyboard; the others get its lines
            import parallel
            line = parallel.from_rank0(sys.stdin.readline() if os.environ.get("RANK", "0") == "0" else None)
        else:
            line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            cache, pending = fresh()
            continue
        first = int(cache.next_pos[0]) == 0
        content = [*images, text] if images and first else text
        new = pending + tok.encode_message("user", content) + tok.encode_header("assistant")
        used = int(cache.next_pos[0])
        if used + len(new) + a.max_new_tokens > context:
            print(f"error: this turn needs {used + len(new) + a.max_new_tokens} tokens of context "
                  f"(> {context}); /reset to start over or raise --max-seq-len", file=sys.stderr, flush=True)
            continue
        stats: dict = {}
        on_token, finish = printer(tok, stop_ids)
        reply = generate(model, [new], a.max_new_tokens, a.temperature, a.top_p, a.top_k, stop_ids,
                         generator, on_token, cache=cache, stats=stats,
                         image_features=image_features if images and first else None)[0]
        finish()
        # The last token was chosen but not fed; an unfinished reply is closed with <|eot|>.
        pending = [reply[-1]] if reply[-1] in stop_ids else [reply[-1], tok.eot_id]
        report(stats, torch.device(a.device), seed)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    check_flags(a)
    tok = load_tokenizer(a)
    texts = read_prompts(a)
    pixels, images = load_images(a, tok)
    prompts = [encode_prompt(tok, t, a, images) for t in texts]
    limit = context_limit(a, model_context(a))
    check_lengths(prompts, a.max_new_tokens, limit)  # before the (possibly long) load of the weights
    model = load(a)
    if distributed() and os.environ.get("RANK", "0") != "0":  # one process speaks for all
        sys.stdout = sys.stderr = open(os.devnull, "w")
    if pixels is not None and model.args.image_token_id != tok.patch_id:
        raise CliError(f"the checkpoint's image token is {model.args.image_token_id} but the tokenizer's "
                       f"<|patch|> is {tok.patch_id} (wrong --tokenizer for this checkpoint?)")
    if tok.n_words > model.args.vocab_size:
        raise CliError(f"the tokenizer has {tok.n_words} ids but the model only {model.args.vocab_size} "
                       "(wrong --tokenizer for this checkpoint?)")
    generator, seed = make_generator(a)
    seed = seed if a.temperature > 0 else None
    image_features = None
    if pixels is not None:
        with torch.no_grad():
            image_features = model.encode_images(pixels.to(a.device))  # (tiles * 144, dim)
    if prompts:
        run_prompts(model, tok, prompts, a, generator, seed, image_features)
    else:
        chat_loop(model, tok, a, generator, seed, min(limit, a.max_seq_len or CHAT_CONTEXT), images, image_features)


if __name__ == "__main__":
    try:
        main()
    except (CliError, CompileError) as e:
        sys.exit(f"error: {e}")
    except torch.OutOfMemoryError:
        sys.exit("error: out of memory (try --quantize, a smaller --max-seq-len or fewer prompts)")
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. `| head`: stop quietly, without a second error when Python flushes stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)

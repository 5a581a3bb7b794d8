"""The data train.py learns from: plain text for pretraining, chat conversations for fine-tuning.

    python data.py                       # the built-in corpus: statistics, and one masked chat example
    python data.py --data my_texts/      # ... for your own text file or directory
    python data.py --sft chats.jsonl     # ... and the first conversation of a chat file, token by token

Pretraining text (`TextData`). Without --data it is text on every machine with Python, no download: the
English reference pages that ship inside CPython (`pydoc_data.topics`, ~0.5 MB: the language reference behind
`help("if")`) plus every docstring of 200+ characters in the standard library's own source (~1.3 MB of prose).
Each document is encoded as `<|begin_of_text|> text <|end_of_text|>`, the documents are shuffled with a fixed
seed and concatenated into one token stream, and the last --val-frac of the tokens is held out. A training
example is a window of seq_len + 1 tokens at a random offset: inputs are its first seq_len tokens, targets
the same shifted by one. `unigram_entropy` is the baseline a model must beat: the loss of predicting every
token from the token frequencies alone, ignoring all context.

Chat fine-tuning (`ChatData`) uses Llama 4's chat format and the loss counts only what the assistant says.
A conversation is

    <|begin_of_text|><|header_start|>user<|header_end|>\\n\\nHi<|eot|>
    <|header_start|>assistant<|header_end|>\\n\\nHello<|eot|>

(one line, no newlines between messages), and only `Hello` and the assistant's closing `<|eot|>` are
targets: the model learns to answer and to stop, not to predict the user's words or the headers (which the
inference code writes itself). Input position t predicts token t + 1, so position t counts iff token t + 1
is a target; the others get the target IGNORE (-100), which cross_entropy skips. Conversations longer than
seq_len are cut; batches are right-padded with `<|finetune_right_pad|>` inputs and IGNORE targets.

Batches are a pure function of (seed, step, micro-batch) through `batch_rng`, which is what lets train.py
resume a run with exactly the losses an uninterrupted run would have had.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from tokenizer import DEBUG_TOKENIZER_PATH, Tokenizer, llama_models_tokenizer_path

IGNORE = -100  # target id of positions that do not count in the loss


class DataError(ValueError):
    """Data that cannot be used (missing, empty, malformed); train.py prints it as one line."""


# --------------------------------------------------------------------------------------------------------
# Pretraining data: text -> one token stream -> random windows
# --------------------------------------------------------------------------------------------------------

def builtin_corpus(min_chars: int = 200) -> list[tuple[str, str]]:
    """(name, text) documents that ship with CPython: the pydoc topic pages and the stdlib's docstrings."""
    docs = []
    try:
        from pydoc_data.topics import topics
        docs += [(f"pydoc:{k}", v) for k, v in sorted(topics.items())]
    except ImportError:
        pass
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append((f"{path.relative_to(root)}:{getattr(node, 'name', '')}", doc))
    if not docs:
        raise DataError(f"no built-in text found (no pydoc_data, no docstrings under {root}): use --data PATH")
    return docs


def read_text_path(path: str) -> list[tuple[str, str]]:
    """A text file, or every UTF-8 file under a directory (hidden ones skipped), one document per file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path}: no such file or directory")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    docs = []
    for f in files:
        try:
            docs.append((str(f), f.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            print(f"data: skipping {f}: not UTF-8 text")
    if not any(text.strip() for _, text in docs):
        raise DataError(f"--data {path}: no UTF-8 text found")
    return docs


class TextData:
    """Documents encoded as <|begin_of_text|> text <|end_of_text|>, shuffled with a fixed seed, concatenated;
    the last val_frac of the tokens is held out. Training windows start at random offsets."""

    def __init__(self, tok: Tokenizer, docs: list[tuple[str, str]], seq_len: int, val_frac: float):
        order = sorted(range(len(docs)), key=lambda i: zlib.crc32(docs[i][0].encode()))  # fixed shuffle
        ids = []
        for i in order:
            ids += tok.encode(docs[i][1], bos=True, eos=True)
        ids = torch.tensor(ids, dtype=torch.long)
        n_val = max(int(len(ids) * val_frac), seq_len + 1)
        if len(ids) - n_val < 2 * (seq_len + 1):
            raise DataError(f"only {len(ids)} tokens of data: too little for --seq-len {seq_len} and a held-out split")
        self.train, self.val, self.seq_len, self.n_docs = ids[:-n_val], ids[-n_val:], seq_len, len(docs)

    def batch(self, g: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.seq_len, (batch_size,), generator=g)
        rows = torch.stack([self.train[s:s + self.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]

    def eval_batches(self, batch_size: int):
        """Consecutive non-overlapping windows of the held-out tokens, the same ones every time."""
        starts = list(range(0, len(self.val) - self.seq_len, self.seq_len))
        for b in range(0, len(starts), batch_size):
            rows = torch.stack([self.val[s:s + self.seq_len + 1] for s in starts[b:b + batch_size]])
            yield rows[:, :-1], rows[:, 1:]


def unigram_entropy(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores all context."""
    p = torch.bincount(ids, minlength=vocab_size).double() / len(ids)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------------------------------------
# Fine-tuning data: chat conversations, loss on the assistant's tokens only
# --------------------------------------------------------------------------------------------------------

def encode_conversation(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the chat format, and per token whether it is a target: the content
    of assistant messages and their closing <|eot|>. Headers, other roles and <|begin_of_text|> are not."""
    ids, is_target = [tok.bos_id], [False]
    for m in messages:
        header = tok.encode_header(m["role"])
        message = tok.encode_message(m["role"], m["content"])  # header + content + <|eot|>
        assert message[:len(header)] == header
        ids += message
        is_target += [False] * len(header) + [m["role"] == "assistant"] * (len(message) - len(header))
    return ids, is_target


def chat_example(ids: list[int], is_target: list[bool], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ids[:-1] and targets ids[1:], IGNORE where the next token is not a target; cut to seq_len."""
    x = torch.tensor(ids[:-1][:seq_len])
    y = torch.tensor([t if keep else IGNORE for t, keep in zip(ids[1:], is_target[1:])][:seq_len])
    return x, y


FORMAT = 'expected {"messages": [{"role": ..., "content": ...}, ...]}'


def read_conversations(path: str) -> list[tuple[int, list[dict]]]:
    """(line number, "messages" list) of each non-empty line of a .jsonl file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--sft {path}: cannot read ({e})") from None
    conversations = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            conversations.append((n, json.loads(line)["messages"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: {FORMAT} ({e})") from None
    return conversations


class ChatData:
    """A .jsonl file with one {"messages": [{"role": ..., "content": ...}, ...]} conversation per line.
    Batches are random conversations, right-padded; the last val_frac of them (fixed shuffle) are held out."""

    def __init__(self, tok: Tokenizer, path: str, seq_len: int, val_frac: float):
        examples, dropped = [], 0
        for n, messages in read_conversations(path):
            try:
                x, y = chat_example(*encode_conversation(tok, messages), seq_len)
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{n}: {FORMAT} ({e})") from None
            if (y != IGNORE).any():
                examples.append((x, y))
            else:
                dropped += 1
        if dropped:
            print(f"sft: dropped {dropped} conversation(s) with no assistant tokens within --seq-len {seq_len}")
        if not examples:
            raise DataError(f"--sft {path}: no conversation with assistant messages")
        order = sorted(range(len(examples)), key=lambda i: zlib.crc32(str(i).encode()))
        n_val = int(len(examples) * val_frac)
        if n_val == 0:
            print(f"sft: only {len(examples)} conversation(s): evaluating on the training conversations")
        self.train = [examples[i] for i in order[:len(order) - n_val]]
        self.val = [examples[i] for i in order[len(order) - n_val:]] or self.train
        self.pad_id = tok.pad_id

    def collate(self, examples):
        T = max(len(x) for x, _ in examples)
        x = torch.full((len(examples), T), self.pad_id)
        y = torch.full((len(examples), T), IGNORE)
        for i, (xi, yi) in enumerate(examples):
            x[i, :len(xi)], y[i, :len(yi)] = xi, yi
        return x, y

    def batch(self, g: torch.Generator, batch_size: int):
        picks = torch.randint(0, len(self.train), (batch_size,), generator=g).tolist()
        return self.collate([self.train[i] for i in picks])

    def eval_batches(self, batch_size: int):
        for b in range(0, len(self.val), batch_size):
            yield self.collate(self.val[b:b + batch_size])


def batch_rng(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator for micro-batch `micro` of optimizer step `step`: data order depends on nothing else."""
    return torch.Generator().manual_seed(seed * 2**40 + step * 2**10 + micro)


# --------------------------------------------------------------------------------------------------------
# What train.py calls
# --------------------------------------------------------------------------------------------------------

def load_tokenizer(cfg) -> tuple[Tokenizer, Path]:
    """--tokenizer; else the one in the --init-from checkpoint; else the debug vocabulary or Meta's."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
    elif cfg.init_from:
        path = Tokenizer.path_in(cfg.init_from)
    else:
        path = DEBUG_TOKENIZER_PATH if cfg.flavor == "debug" else llama_models_tokenizer_path()
    if path is None:
        raise DataError(f"no tokenizer.model/tokenizer.json found{' in ' + cfg.init_from if cfg.init_from else ''}: "
                        "pass --tokenizer PATH")
    try:
        return Tokenizer.from_file(path), path
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None


def load_data(cfg, tok: Tokenizer):
    """The dataset, and for plain text the unigram baseline: the entropy of the training tokens' frequencies."""
    t0 = time.time()
    if cfg.sft:
        data = ChatData(tok, cfg.sft, cfg.seq_len, cfg.val_frac)
        print(f"data: {len(data.train)} training / {len(data.val)} held-out conversations ({time.time() - t0:.1f} s)")
        return data, None
    data = TextData(tok, read_text_path(cfg.data) if cfg.data else builtin_corpus(), cfg.seq_len, cfg.val_frac)
    baseline = unigram_entropy(data.train, tok.n_words)
    print(f"data: {data.n_docs} documents -> {len(data.train):,} training + {len(data.val):,} held-out tokens "
          f"({time.time() - t0:.1f} s); unigram entropy of the training tokens {baseline:.3f} nats")
    return data, baseline


# --------------------------------------------------------------------------------------------------------
# python data.py: look at the data
# --------------------------------------------------------------------------------------------------------

EXAMPLE_CHAT = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What does help(\"if\") show?"},
                {"role": "assistant", "content": "The language reference page on the if statement."}]


def show_text_data(tok: Tokenizer, data: TextData, baseline: float, seq_len: int) -> None:
    counts = torch.bincount(data.train, minlength=tok.n_words)
    print(f"distinct tokens used: {int((counts > 0).sum()):,} of {tok.n_words:,}; a model that ignores context "
          f"scores {baseline:.3f} nats/token, uniform guessing ln({tok.n_words}) = {math.log(tok.n_words):.3f}")
    top = counts.topk(10)
    print("most frequent: " + ", ".join(f"{tok.decode([i])!r} {100 * c / len(data.train):.1f}%"
                                         for c, i in zip(top.values.tolist(), top.indices.tolist())))
    x, y = data.batch(batch_rng(1337, 0, 0), 1)  # (1, T): the first window of step 0 with the default seed
    print(f"\na training window (step 0, {seq_len} tokens; the target of every token is the next one):\n"
          f"{tok.decode(x[0].tolist())!r}")


def show_chat_example(tok: Tokenizer, messages: list[dict], seq_len: int) -> None:
    """Every input token of one conversation, the token it must predict, and whether that counts."""
    ids, is_target = encode_conversation(tok, messages)
    x, y = chat_example(ids, is_target, seq_len)
    print(f"\none chat example ({len(x)} inputs, {int((y != IGNORE).sum())} of them count in the loss):")
    print(f"  {'pos':>4}  {'input':<22} {'target: the next token, or IGNORE':<36} counts")
    for t, (xi, yi) in enumerate(zip(x.tolist(), y.tolist())):
        target = repr(tok.decode([yi])) if yi != IGNORE else f"IGNORE ({tok.decode([ids[t + 1]])!r})"
        print(f"  {t:4d}  {tok.decode([xi])!r:<22} {target:<36} {'yes' if yi != IGNORE else 'no'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Show what train.py trains on: corpus statistics and one chat "
                                            "example with the tokens that count in the SFT loss.")
    p.add_argument("--data", metavar="PATH", help="a text file or directory (default: the built-in corpus)")
    p.add_argument("--sft", metavar="FILE.jsonl", help="show this file's first conversation instead of an example")
    p.add_argument("--tokenizer", metavar="PATH", default=str(DEBUG_TOKENIZER_PATH))
    p.add_argument("--seq-len", metavar="T", type=int, default=64)
    p.add_argument("--val-frac", metavar="F", type=float, default=0.1)
    a = p.parse_args(argv)
    try:
        tok = Tokenizer.from_file(a.tokenizer)
        cfg = argparse.Namespace(sft=None, data=a.data, seq_len=a.seq_len, val_frac=a.val_frac)
        data, baseline = load_data(cfg, tok)
        show_text_data(tok, data, baseline, a.seq_len)
        messages = read_conversations(a.sft)[0][1] if a.sft else EXAMPLE_CHAT
        show_chat_example(tok, messages, a.seq_len)
    except (DataError, FileNotFoundError, IndexError) as e:
        raise SystemExit(f"error: {e if not isinstance(e, IndexError) else f'{a.sft}: no conversation'}")


if __name__ == "__main__":
    main()

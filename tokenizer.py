"""Llama 4 tokenizer: byte-level BPE on tiktoken, 2,048 special tokens, and the chat format.

What is particular to Llama 4:

1. The vocabulary is 200,000 byte-level BPE ranks plus 2,048 special tokens placed right after
   them (ids 200,000 .. 202,047), so the embedding table has 202,048 rows. The pre-split regex is
   an o200k-style pattern (case-aware words, numbers in groups of at most 3 digits, punctuation
   runs that swallow a trailing newline or slash).
2. The chat format is new: `<|header_start|>ROLE<|header_end|>\\n\\n CONTENT <|eot|>`
   (Llama 3 used `<|start_header_id|>` / `<|eot_id|>`). Generation stops on any of
   `<|end_of_text|>`, `<|eom|>` (end of message, e.g. a tool call awaits its result) or `<|eot|>`.
3. Images enter the token stream as special tokens (`<|image_start|>`, `<|patch|>` x 144 per tile,
   `<|tile_x_separator|>`, `<|tile_y_separator|>`, `<|image|>`, `<|image_end|>`); vision.py builds
   those id lists and `encode_message` splices them into the text.

The vocabulary ships in two forms, both read here without the `tokenizers` package:
Meta's `tokenizer.model` (one line per token: `base64(bytes) rank`) and Hugging Face's
`tokenizer.json` (vocab strings are bytes spelled through GPT-2's bytes-to-unicode table; a
token's id is its BPE rank). Special tokens always start at id = number of BPE ranks, so the small
debug vocabulary (first 8,192 ranks, specials at 8,192 .. 10,239) behaves exactly the same way.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

import tiktoken

# The pre-tokenization regex of Meta's Llama 4 tokenizer (an o200k-style pattern).
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

NUM_SPECIAL_TOKENS = 2048
# tiktoken's Rust core can panic on very long inputs; Meta encodes at most this many chars per call
MAX_ENCODE_CHARS = 400_000
# ... and breaks any run of whitespace or of non-whitespace longer than this (tiktoken issue #195).
MAX_RUN_CHARS = 25_000

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEBUG_TOKENIZER_PATH = ASSETS_DIR / "debug-tokenizer.model"

Content = Union[str, Sequence[Union[str, Sequence[int]]]]


# ----------------------------------------------------------------------------------------------
# The 2,048 special tokens, in id order (offsets from the number of BPE ranks)
# ----------------------------------------------------------------------------------------------

def _reserved(group: str, first: int, count: int) -> list[str]:
    return [f"<|{group}_reserved_special_token_{i}|>" for i in range(first, first + count)]


def special_token_names() -> list[str]:
    """The names of the 2,048 special tokens; the k-th one has id n_bpe + k."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    # offsets 5 .. 79
    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += _reserved("text_post_train", 0, 6)
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    text += _reserved("text_post_train", 8, 61)
    # offsets 80 .. 1133
    vision = ["<|image_start|>", "<|image_end|>"] + _reserved("vision", 0, 2)
    vision += ["<|tile_x_separator|>", "<|tile_y_separator|>"] + _reserved("vision", 2, 4)
    vision += ["<|image|>"] + _reserved("vision", 6, 1) + ["<|patch|>"] + _reserved("vision", 7, 1041)
    # offsets 1134 .. 1143
    reasoning = _reserved("reasoning", 0, 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    # the rest, 1144 .. 2047, is plain `<|reserved_special_token_i|>`
    names = named + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))]
    assert len(names) == len(set(names)) == NUM_SPECIAL_TOKENS
    return names


# ----------------------------------------------------------------------------------------------
# Reading and writing the two vocabulary file forms
# ----------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocab files.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) map, in byte order, to the code points 256, 257, ...
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """Ranks must be 0..n-1 without gaps, and every single byte must be a token (else tiktoken panics)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes are not tokens (first: 0x{missing[0]:02x})")


def load_tiktoken_model(path: Union[str, Path]) -> dict[bytes, int]:
    """Read Meta's `tokenizer.model`: lines `base64(token_bytes) rank` -> {token_bytes: rank}."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line.strip()[:60]!r}") from None
    _check_ranks(ranks, path)
    return ranks


def load_tokenizer_json(path: Union[str, Path]) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read a Hugging Face byte-level BPE `tokenizer.json` -> (mergeable ranks, special tokens in file).

    The vocab maps strings to ids; each string is token bytes spelled with bytes_to_unicode(), and
    the id is the BPE rank (tiktoken merges the lowest-ranked pair first, as HF's BPE does).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a BPE tokenizer.json (need model.vocab): {e}") from None
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    added_ids = set(added.values())
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for text, rank in vocab.items():
        if rank in added_ids:  # some files list special tokens in the vocab too
            continue
        try:
            ranks[bytes(char_to_byte[c] for c in text)] = rank
        except KeyError:
            raise ValueError(f"{path}: vocab entry {text!r} is not byte-level BPE (unknown character)") from None
    _check_ranks(ranks, path)
    return ranks, added


def write_tiktoken_model(ranks: dict[bytes, int], path: Union[str, Path]) -> None:
    """Write ranks as a `tokenizer.model` file, atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def llama_models_tokenizer_path() -> Path | None:
    """The real `tokenizer.model` shipped inside Meta's llama-models package, if installed."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "llama4" / "tokenizer.model"
    return path if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# Long-input splitting (same cut points as Meta's, so the ids match exactly)
# ----------------------------------------------------------------------------------------------

# A run of more than MAX_RUN_CHARS whitespace or non-whitespace chars, matched from its first char.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Yield pieces of `text` that are safe for tiktoken: <= 400k chars, runs cut every 25k chars.

    Windows of 400k chars are cut first; inside a window a run of R > 25k same-kind chars starting
    at s is cut at s + 25k, s + 50k, ... Concatenating the pieces gives back `text`.
    """
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start : start + MAX_ENCODE_CHARS]
        cuts = [0]
        for run in _LONG_RUN.finditer(window):
            cuts.extend(range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS))
        cuts.append(len(window))
        for a, b in zip(cuts, cuts[1:]):
            yield window[a:b]


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------

class Tokenizer:
    """Llama 4 tokenizer: `n_bpe` BPE ranks, then 2,048 special tokens (ids n_bpe .. n_bpe + 2047)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "llama4"):
        self.n_bpe = len(mergeable_ranks)
        self.special_tokens = {tok: self.n_bpe + k for k, tok in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(
            name=name, pat_str=PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.n_words = self.vocab_size = self.n_bpe + NUM_SPECIAL_TOKENS
        sp = self.special_tokens
        self.bos_id = sp["<|begin_of_text|>"]
        self.eos_id = sp["<|end_of_text|>"]
        self.header_start_id = sp["<|header_start|>"]
        self.header_end_id = sp["<|header_end|>"]
        self.eom_id = sp["<|eom|>"]
        self.eot_id = sp["<|eot|>"]
        self.pad_id = sp["<|finetune_right_pad|>"]
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)
        self.image_start_id = sp["<|image_start|>"]
        self.image_end_id = sp["<|image_end|>"]
        self.image_id = sp["<|image|>"]
        self.patch_id = sp["<|patch|>"]
        self.tile_x_separator_id = sp["<|tile_x_separator|>"]
        self.tile_y_separator_id = sp["<|tile_y_separator|>"]

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Tokenizer":
        """Load Meta's `tokenizer.model` or Hugging Face's `tokenizer.json` (detected by content)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, "rb") as f:
            is_json = f.read(64).lstrip().startswith(b"{")
        if not is_json:
            return cls(load_tiktoken_model(path), name=path.name)
        ranks, file_specials = load_tokenizer_json(path)
        tok = cls(ranks, name=path.name)
        wrong = [f"{n} is {i}, expected {tok.special_tokens[n]}"
                 for n, i in file_specials.items() if n in tok.special_tokens and tok.special_tokens[n] != i]
        if wrong:
            raise ValueError(f"{path}: special token ids differ from Llama 4's: {'; '.join(wrong[:3])}")
        return tok

    @staticmethod
    def candidate_paths(checkpoint_dir: Union[str, Path]) -> list[Path]:
        """Where `find` looks, in order (HF snapshots keep Meta's file under `original/`)."""
        d = Path(checkpoint_dir)
        return [d / "tokenizer.model", d / "original" / "tokenizer.model",
                d / "tokenizer.json", d / "original" / "tokenizer.json"]

    @classmethod
    def path_in(cls, checkpoint_dir: Union[str, Path]) -> Path | None:
        """The first of `candidate_paths` that exists, or None."""
        return next((p for p in cls.candidate_paths(checkpoint_dir) if p.is_file()), None)

    @classmethod
    def find(cls, checkpoint_dir: Union[str, Path]) -> "Tokenizer":
        """Load the tokenizer of a checkpoint directory (or a tokenizer file given directly)."""
        if Path(checkpoint_dir).is_file():
            return cls.from_file(checkpoint_dir)
        path = cls.path_in(checkpoint_dir)
        if path is None:
            looked = ", ".join(str(p) for p in cls.candidate_paths(checkpoint_dir))
            raise FileNotFoundError(f"no tokenizer found; looked for: {looked}")
        return cls.from_file(path)

    @classmethod
    def debug(cls) -> "Tokenizer":
        """The debug vocabulary: the real one's first 8,192 ranks + 2,048 specials = 10,240 ids."""
        return cls.from_file(DEBUG_TOKENIZER_PATH)

    # -- text <-> ids ----------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` stay plain text unless allow_special=True."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        ids = [self.bos_id] if bos else []
        for piece in split_for_tiktoken(text):
            ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (invalid UTF-8, e.g. a cut multi-byte char, becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        bad = [i for i in ids if not 0 <= int(i) < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.n_words})")
        return self.model.decode_bytes([int(i) for i in ids])

    def piece(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's bytes are its name)."""
        return self.decode_bytes([token_id])

    # -- chat format -----------------------------------------------------------------------------

    def encode_header(self, role: str) -> list[int]:
        """`<|header_start|>ROLE<|header_end|>\\n\\n`; Meta spells the tool role `ipython`."""
        role = "ipython" if role == "tool" else role
        return [self.header_start_id, *self.encode(role), self.header_end_id, *self.encode("\n\n")]

    def encode_content(self, content: Content) -> list[int]:
        """A str, or a list whose items are str (text) or lists of ids (e.g. image tokens from vision.py).

        Each text item is encoded on its own, as Meta's ChatFormat does.
        """
        items = [content] if isinstance(content, str) else content
        ids: list[int] = []
        for item in items:
            if isinstance(item, str):
                ids.extend(self.encode(item))
            else:
                item = [int(i) for i in item]
                if any(not 0 <= i < self.n_words for i in item):
                    raise ValueError(f"content token ids must be in [0, {self.n_words})")
                ids.extend(item)
        return ids

    def encode_message(self, role: str, content: Content) -> list[int]:
        """One turn: header, content, then `<|eot|>` (`<|eom|>` for tool results, as in Meta's code)."""
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"unknown chat role {role!r}; expected system, user, assistant or tool")
        end = self.eom_id if role == "tool" else self.eot_id
        return self.encode_header(role) + self.encode_content(content) + [end]

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """`<|begin_of_text|>` + every message [+ an open assistant header for the model to complete]."""
        ids = [self.bos_id]
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
            ids.extend(self.encode_message(msg["role"], msg["content"]))
        if add_generation_prompt:
            ids.extend(self.encode_header("assistant"))
        return ids


class StreamDecoder:
    """Turns ids into text one at a time without ever splitting a multi-byte UTF-8 character.

    A token may end in the middle of a character (byte-level BPE); its bytes wait in the
    incremental UTF-8 decoder until the character is complete.

        stream = StreamDecoder(tokenizer)
        for token_id in generated:
            print(stream.feed(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one id; return the text completed by it (possibly '')."""
        return self._utf8.decode(self.tokenizer.piece(token_id))

    def flush(self) -> str:
        """End of stream: bytes still pending (an unfinished character) come out as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Show the Llama 4 token ids and pieces of a text.")
    p.add_argument("text", help="text to encode")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model / tokenizer.json file or checkpoint directory "
                        "(default: the tokenizer.model shipped with llama-models)")
    p.add_argument("--debug", action="store_true", help="use the 10,240-id debug vocabulary")
    p.add_argument("--chat", action="store_true", help="wrap the text as a user message in the chat format")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the user message")
    p.add_argument("--allow-special", action="store_true", help="encode special-token strings as special tokens")
    args = p.parse_args(argv)

    if args.debug:
        tok = Tokenizer.debug()
    elif args.tokenizer:
        tok = Tokenizer.find(args.tokenizer)
    else:
        path = llama_models_tokenizer_path()
        if path is None:
            p.error("llama-models is not installed: pass --tokenizer PATH or --debug")
        tok = Tokenizer.from_file(path)

    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_dialog(messages + [{"role": "user", "content": args.text}])
    else:
        ids = tok.encode(args.text, allow_special=args.allow_special)
    print(f"{len(ids)} tokens (vocab {tok.n_words}): {ids}")
    for i in ids:
        print(f"{i:>7}  {tok.piece(i).decode('utf-8', errors='backslashreplace')!r}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

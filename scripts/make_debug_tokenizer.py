"""Write assets/debug-tokenizer.model: the first 8,192 BPE ranks of the real Llama 4 vocabulary.

Truncating a BPE vocabulary to its first N ranks is only a valid BPE vocabulary if
  (a) all 256 single bytes are among them (tiktoken must be able to fall back to bytes), and
  (b) every kept multi-byte token is the merge of two kept tokens of lower rank, i.e. running BPE
      on the token's own bytes with only the ranks below it ends in exactly two parts.
Then the truncated vocabulary is what BPE training would have produced had it stopped after
N - 256 merges. Llama 4's vocabulary satisfies both for N = 8192 (bytes are ranks 0..255); this
script checks them again and refuses to write the file otherwise. The 2,048 special tokens are
not stored in the file: tokenizer.py places them at N .. N + 2047, so the debug vocab has 10,240 ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DEBUG_TOKENIZER_PATH, load_tiktoken_model, llama_models_tokenizer_path, write_tiktoken_model  # noqa: E402


def bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Plain BPE of `token`'s bytes using only ranks < below: merge the lowest-ranked pair until none."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1], below), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= below:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def truncation_problems(ranks: dict[bytes, int], n: int) -> list[str]:
    """Reasons why the first n ranks would not form a valid BPE vocabulary (empty list: valid)."""
    kept = {tok: r for tok, r in ranks.items() if r < n}
    problems = [f"single byte 0x{b:02x} has rank {ranks[bytes([b])]} >= {n}" for b in range(256)
                if ranks[bytes([b])] >= n]
    for tok, r in kept.items():
        if len(tok) > 1 and len(bpe_parts(tok, kept, r)) != 2:
            problems.append(f"rank {r} {tok!r} is not one merge of two lower-ranked tokens")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, default=llama_models_tokenizer_path(),
                   help="the real tokenizer.model (default: the one shipped with llama-models)")
    p.add_argument("--n-ranks", type=int, default=8192, help="how many BPE ranks to keep (default 8192)")
    p.add_argument("--out", type=Path, default=DEBUG_TOKENIZER_PATH, help="output file (default %(default)s)")
    args = p.parse_args()
    if args.source is None:
        sys.exit("error: llama-models is not installed; pass --source path/to/tokenizer.model")

    ranks = load_tiktoken_model(args.source)
    problems = truncation_problems(ranks, args.n_ranks)
    if problems:
        sys.exit(f"error: first {args.n_ranks} ranks are not a valid BPE vocabulary: {problems[0]} "
                 f"({len(problems)} problems)")
    kept = {tok: r for tok, r in ranks.items() if r < args.n_ranks}
    write_tiktoken_model(kept, args.out)
    print(f"wrote {args.out}: {len(kept)} BPE ranks (+2048 specials = {len(kept) + 2048} ids), "
          f"{args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()

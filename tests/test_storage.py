"""Tests for storage.py: the safetensors writer against the safetensors library's reader, and the listing CLI
against a file the library wrote, with byte counts worked out by hand from dtype sizes and shapes.
(The mmap reader, madvise release, safe .pth loading and crash-safe saving are exercised through
checkpoint.py in tests/test_checkpoint.py.)"""
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from storage import SafetensorsFile, write_safetensors  # noqa: E402


def test_write_safetensors_is_read_back_by_the_library_and_by_our_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=g).t(),  # not contiguous: written in its logical order
        "b.bf16": torch.randn(4, generator=g).to(torch.bfloat16),
        "c.fp8": torch.randn(2, 8, generator=g).to(torch.float8_e4m3fn),
        "d.mask": torch.tensor([True, False, True]),
        "e.empty": torch.zeros(0, 7),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, {"note": "hello"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "hello"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8)), name
    ours = SafetensorsFile(path)
    for name, t in tensors.items():
        assert torch.equal(ours.tensor(name).view(torch.uint8), t.contiguous().view(torch.uint8)), name


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "storage.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_lists_tensors_and_metadata(tmp_path):
    path = tmp_path / "lib.safetensors"
    save_file({"w": torch.zeros(2, 3, dtype=torch.bfloat16), "ids": torch.zeros(5, dtype=torch.int8),
               "m": torch.zeros(4, 4)}, str(path), metadata={"format": "pt", "who": "test"})
    r = run_cli(path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:4]}
    # bytes by hand: bf16 2x3 = 6 x 2 B, int8 5 x 1 B, fp32 4x4 = 16 x 4 B
    assert rows == {"w": ["BF16", "[2,", "3]", "12"], "ids": ["I8", "[5]", "5"], "m": ["F32", "[4,", "4]", "64"]}
    assert "3 tensors, 81 bytes of data" in r.stdout
    assert "metadata format: pt" in r.stdout and "metadata who: test" in r.stdout


def test_cli_errors_are_one_line(tmp_path):
    not_st = tmp_path / "notes.txt"
    not_st.write_text("just some text, long enough to have an 8-byte header length")
    not_entries = tmp_path / "list.safetensors"  # a header that is JSON, but not a dict of tensor entries
    head = b'[1, 2, 3]'
    not_entries.write_bytes(len(head).to_bytes(8, "little") + head)
    for bad in (tmp_path / "missing.safetensors", not_st, not_entries):
        r = run_cli(bad)
        assert r.returncode != 0 and r.stdout == ""
        assert r.stderr.startswith("error:") and bad.name in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1

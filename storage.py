"""How tensors get to and from disk without a second copy: the file side of checkpoint.py and quantize.py.

Scout is 218 GB in bf16, so a checkpoint must never be in memory twice, and a crash while saving must never
leave half of one. Four facts do it:

- A .safetensors file (8 bytes of header length, a JSON header, then every tensor's raw bytes) is read through
  mmap: `SafetensorsFile.tensor` is a view of the mapping (zero copy), and the kernel reads a page the first
  time it is touched. The mapping is private (MAP_PRIVATE, copy-on-write), so a view may be written to: the
  writes go to this process's own copies of the pages, never to the file.
- `release(t)` hands a tensor's pages back to the kernel (madvise MADV_DONTNEED): streaming a checkpoint one
  tensor at a time then keeps the resident memory near one tensor, not the whole file.
- Meta's `.pth` shards are zips of pickles. `load_pth` memory-maps them too and unpickles with
  `weights_only=True` (tensors and plain containers only: a checkpoint can never run code), allowing just
  the two harmless globals, io.BytesIO and codecs.encode, that the `._extra_state` entries of Meta's
  release need.
- Saving writes into a temporary directory beside the destination (`staged`); `publish` syncs every file to
  disk, then renames it into place, the weights last. A rename is atomic, so a crash at any moment leaves
  each file whole, old or new, never half-written (a new directory appears in one rename).
  `write_safetensors` streams a state dict into a file one tensor at a time.

    python storage.py FILE.safetensors     # list its tensors (name, dtype, shape, bytes) and metadata
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import io
import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint this code cannot load, with a message that says why."""


# --------------------------------------------------------------------------------------------------------
# Reading tensors from memory-mapped files
# --------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """A .safetensors file read through mmap: 8 bytes of header length, a JSON header, then raw data.

    `tensor(name)` is a zero-copy view into the mapping; `release(tensor)` tells the kernel we are done with
    its pages, so the resident memory does not grow with every tensor read. The mapping is private
    (ACCESS_COPY = MAP_PRIVATE): writes through a view stay in this process. Each view's storage holds a
    reference to the mmap object (torch.frombuffer), so the mapping lives as long as any view does; it is
    never closed explicitly (closing it would leave the views pointing at unmapped memory).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} > file size {size})")
            try:
                header = json.loads(f.read(n))
                self.metadata = header.pop("__metadata__", None) or {}
                end = max((e["data_offsets"][1] for e in header.values()), default=0)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
                raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
            self.entries, self.data_start = header, 8 + n
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: truncated: the header needs {self.data_start + end} bytes, "
                                      f"the file has {size}")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.entries[name]["data_offsets"]
        return end - start

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        dtype = _SAFETENSORS_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        if end == start:
            return torch.empty(e["shape"], dtype=dtype)
        t = torch.frombuffer(self.mm, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=self.data_start + start)
        return t.view(e["shape"])


def release(t: torch.Tensor) -> None:
    """Drop the pages behind a memory-mapped tensor from this process's resident memory (Linux madvise).

    The pages are clean copies of the file, so the kernel re-reads them if they are ever touched again. A
    strided view (one half of a fused tensor) spans from its first element to its last, gaps included.
    """
    if not hasattr(os, "sched_getaffinity") or t.numel() == 0:  # Linux only; elsewhere the OS reclaims them
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()  # last element
    start = (start + page - 1) // page * page  # only whole pages that belong to this tensor alone
    end = end // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def trim_heap() -> None:
    """Hand memory that this process freed back to the kernel (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed blocks for reuse, and once a large block has been freed it serves later ones of that
    size from its heap too, which only shrinks from the top: building many tensors with a temporary each
    (cpu_decode.prepare_for_decode) then keeps the freed temporaries resident, ~25% of the model.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def load_pth(path: Path) -> dict:
    """A Meta shard, memory-mapped, with the safe unpickler: tensors and plain containers only. The release's
    `*._extra_state` entries (TransformerEngine FP8 state, not weights) are pickled io.BytesIO objects, so
    exactly the two harmless globals they need are allowed, as Meta's own loader does."""
    try:
        with torch.serialization.safe_globals([io.BytesIO, codecs.encode]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a truncated zip, a pickle that wants code, not a .pth at all
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


# --------------------------------------------------------------------------------------------------------
# Writing: one tensor at a time, into a directory published by renames
# --------------------------------------------------------------------------------------------------------

_ST_DTYPES = {dt: name for name, dt in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format by hand (8-byte header length, JSON header, raw bytes), streamed one tensor
    at a time so that writing never holds a second copy of the model."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """A temporary directory beside `path` for the caller to write a checkpoint into; on success everything
    is published into `path` (with the tokenizer file, if given), and the directory is always removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish(tmp, path, tokenizer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, path: Path, tokenizer: str | os.PathLike | None = None) -> None:
    """Move a checkpoint written in the temporary directory `tmp` into `path`, crash-safely: add the tokenizer
    (under the name tokenizer.Tokenizer.find looks for), sync every file, then rename (each rename is atomic)."""
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / ("tokenizer.json" if str(tokenizer).endswith(".json") else "tokenizer.model"))
    for f in tmp.iterdir():  # the bytes must be on disk before a rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if not path.exists():
        os.replace(tmp, path)  # a new directory appears whole
    else:  # replace file by file, weights last
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "model.safetensors"):
            os.replace(f, path / f.name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="List the tensors (name, dtype, shape, bytes) and the metadata of a "
                                            ".safetensors file, reading only its header.")
    p.add_argument("file", help="a .safetensors file")
    a = p.parse_args(argv)
    try:
        st = SafetensorsFile(Path(a.file))
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    width = max((len(n) for n in st.keys()), default=6)
    print(f"{'tensor':<{width}}  {'dtype':<7} {'shape':<20} {'bytes':>15}")
    for name in st.keys():
        shape = str(list(st.shape(name)))
        print(f"{name:<{width}}  {st.entries[name]['dtype']:<7} {shape:<20} {st.nbytes(name):>15,}")
    print(f"{len(st.keys())} tensors, {sum(st.nbytes(n) for n in st.keys()):,} bytes of data")
    for key, value in st.metadata.items():
        print(f"metadata {key}: {value}")


if __name__ == "__main__":
    main()

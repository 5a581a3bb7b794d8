"""Rotary position embeddings (RoPE) as Llama 4 uses them, and the iRoPE layer schedule.

Three facts make Llama 4's RoPE its own:

1. Pairs are *interleaved*: dimensions (2i, 2i+1) of a head form one complex number that is rotated by
   position * freq_i. (Many Llama ports use "rotate_half", which pairs i with i + D/2: the released weights
   are not laid out for that.) The rotation is done in fp32 and cast back.
2. Frequencies may be rescaled the Llama 3 way for long context. Scout's checkpoints say how (Meta's code:
   factor 16, low = high = 1, original context 8192 -- a hard step: every wavelength above 8192 tokens is
   divided by 16, every shorter one left alone). Maverick uses no scaling. Always read the numbers from the
   checkpoint's config.
3. iRoPE: every 4th layer (3, 7, 11, ... counting from 0) uses *no* positional encoding at all (NoPE) and
   attends globally; the other layers use RoPE and attend only inside fixed chunks of 8192 tokens.

The vision encoder's 2D RoPE (x and y frequencies on one head) lives beside its user in vision.py.

Run `python rope.py` to print Scout's frequency scaling and the layer schedule and draw them as a PNG.
"""
from __future__ import annotations

import argparse
import math

import torch


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The head_dim/2 rotation frequencies (radians per token), fp32, optionally Llama-3 scaled."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    freqs = 1.0 / (theta ** exponents)  # (D/2,)
    if scaling:
        freqs = llama3_scale(freqs, **scaling)
    return freqs


def llama3_scale(freqs: torch.Tensor, factor: float, low_freq_factor: float = 1.0,
                 high_freq_factor: float = 1.0, original_context: int = 8192) -> torch.Tensor:
    """Llama 3 frequency scaling: long wavelengths / factor, short ones kept, a smooth band between.

    With wavelength w = 2*pi/f and old context L: w < L/high -> f; w > L/low -> f/factor; otherwise
    interpolate linearly in L/w between the two. When low == high (Scout: both 1) the middle band is empty
    and the rule is a hard step; the interpolation weight is never computed there, so nothing divides by 0.
    """
    wavelen = 2 * math.pi / freqs
    short = wavelen < original_context / high_freq_factor  # high frequencies: keep
    long = wavelen > original_context / low_freq_factor    # low frequencies: slow down by `factor`
    scaled = freqs / factor
    if high_freq_factor != low_freq_factor:
        smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        middle = (1 - smooth) * scaled + smooth * freqs
    else:
        middle = freqs  # unreachable: with low == high every wavelength is either short or long
    return torch.where(short, freqs, torch.where(long, scaled, middle))


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^{i * pos * f} for each position and frequency: (..., T) -> (..., T, D/2)."""
    angles = positions.to(torch.float32)[..., None] * freqs.to(positions.device)  # (..., T, D/2)
    return torch.polar(torch.ones_like(angles), angles)  # complex64


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, D) by cis (B, T, D/2) or (T, D/2), in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, D/2)
    cis = cis.unsqueeze(-2)  # broadcast over heads: (B, T, 1, D/2)
    return torch.view_as_real(xc * cis).flatten(-2).type_as(x)  # (B, T, H, D)


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope in real arithmetic, for compilers that handle complex numbers poorly (cpu_decode.py): each
    interleaved pair (a, b) of x (..., D), fp32, becomes (a cos - b sin, a sin + b cos); cos, sin (..., D/2)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def nope_layers(n_layers: int, interval: int = 4) -> list[int]:
    """iRoPE: layers i with (i + 1) % interval == 0 have no RoPE: 3, 7, 11, ... (not 0, 4, 8)."""
    return [i for i in range(n_layers) if interval and (i + 1) % interval == 0]


def _plot(path: str, freqs: torch.Tensor, scaled: torch.Tensor, n_layers: int, nope: list[int]) -> None:
    from plot import Figure  # pillow-only plotting helper of this project

    fig = Figure(2, 1, title="Llama 4 Scout RoPE: Llama-3 scaling and the iRoPE schedule")
    wl = (2 * math.pi / freqs).tolist()
    ax = fig.axes(0, "wavelength (tokens, log10)", "frequency (log10)")
    ax.line([math.log10(w) for w in wl], [math.log10(f) for f in freqs.tolist()], "original", 0)
    ax.line([math.log10(w) for w in wl], [math.log10(f) for f in scaled.tolist()], "scaled", 1)
    ax.vline(math.log10(8192), "8192")
    ax = fig.axes(1, "layer", "1 = RoPE + chunked attention, 0 = NoPE + global")
    ax.bars([0 if i in nope else 1 for i in range(n_layers)], ["NoPE" if i in nope else "" for i in range(n_layers)])
    fig.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description="Show Llama 4's RoPE frequency scaling and iRoPE layer schedule.")
    p.add_argument("--head-dim", type=int, default=128, help="per-head dimension (Scout/Maverick: 128)")
    p.add_argument("--theta", type=float, default=500000.0, help="RoPE base (Scout/Maverick: 5e5)")
    p.add_argument("--factor", type=float, default=16.0, help="Llama-3 scaling factor (Scout in Meta's code: 16)")
    p.add_argument("--low", type=float, default=1.0, help="low_freq_factor")
    p.add_argument("--high", type=float, default=1.0, help="high_freq_factor")
    p.add_argument("--original-context", type=int, default=8192, help="original_max_position_embeddings")
    p.add_argument("--layers", type=int, default=48, help="number of layers for the schedule")
    p.add_argument("--png", default=None, help="write the picture here (e.g. rope.png)")
    a = p.parse_args()
    scaling = dict(factor=a.factor, low_freq_factor=a.low, high_freq_factor=a.high, original_context=a.original_context)
    freqs = rope_frequencies(a.head_dim, a.theta)
    scaled = rope_frequencies(a.head_dim, a.theta, scaling)
    print(f"{'pair':>4} {'wavelength':>14} {'freq':>12} {'scaled freq':>12} {'ratio':>6}")
    for i in range(0, a.head_dim // 2, 4):
        w = 2 * math.pi / freqs[i].item()
        print(f"{i:>4} {w:>14.1f} {freqs[i].item():>12.4e} {scaled[i].item():>12.4e} {freqs[i].item() / scaled[i].item():>6.1f}")
    kept = int((scaled == freqs).sum())
    print(f"{kept} of {a.head_dim // 2} frequencies kept, {a.head_dim // 2 - kept} divided by up to {a.factor:g}")
    nope = nope_layers(a.layers)
    print(f"NoPE layers (global attention, no RoPE): {nope}")
    print("layer kinds: " + "".join("N" if i in nope else "R" for i in range(a.layers)) + "  (R = RoPE + chunked)")
    if a.png:
        _plot(a.png, freqs, scaled, a.layers, nope)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()

"""Tests for plot.py: image size, where data land in pixels (worked out by hand from the layout
margins), bar heights, NaN handling, log axis, heatmap colours, and atomic saving."""
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import plot  # noqa: E402
from plot import Figure  # noqa: E402

W, H = 400, 300  # panel size used below; no title, so the single panel starts at (0, 0)
L, T, R, B = plot.LEFT, plot.TOP, W - plot.RIGHT, H - plot.BOTTOM  # plot area, per the module docstring


def _save(fig, tmp_path, name="fig.png"):
    path = tmp_path / name
    fig.save(str(path))
    return Image.open(path).convert("RGB")


def _near(img, x, y, rgb, radius=3):
    """Whether any pixel within `radius` of (x, y) has colour rgb."""
    return any(img.getpixel((i, j)) == rgb
               for i in range(round(x) - radius, round(x) + radius + 1)
               for j in range(round(y) - radius, round(y) + radius + 1)
               if 0 <= i < img.width and 0 <= j < img.height)


def test_png_size(tmp_path):
    fig = Figure(2, 3, title="sizes", size=(300, 200))
    fig.axes(4, "x", "y").line([0, 1], [0, 1])
    img = _save(fig, tmp_path)
    assert img.size == (3 * 300, plot.TITLE_H + 2 * 200)
    fig = Figure(1, 1)  # no title: no title band; default panel is 640 x 360
    fig.axes(0).line([0, 1], [0, 1])
    assert _save(fig, tmp_path, "b.png").size == (640, 360)


def test_line_hits_plot_area_corners(tmp_path):
    fig = Figure(1, 1, size=(W, H))
    ax = fig.axes(0, "x", "y")
    ax.set_xlim(0, 10)
    ax.set_ylim(-1, 1)
    ax.line([0, 10], [-1, 1], color=3)
    img = _save(fig, tmp_path)
    c = plot.PALETTE[3]
    assert _near(img, L, B, c) and _near(img, R, T, c)  # (xmin, ymin) -> bottom-left, (xmax, ymax) -> top-right
    assert _near(img, (L + R) / 2, (T + B) / 2, c, radius=1)
    assert not _near(img, L + 5, T + 5, c) and not _near(img, R - 5, B - 5, c)  # the other two corners


def test_auto_limits_pad_five_percent(tmp_path):
    fig = Figure(1, 1, size=(W, H))
    fig.axes(0).line([0, 10], [0, 5], color=1)
    img = _save(fig, tmp_path)
    # x limits -0.5..10.5 and y limits -0.25..5.25: the ends sit 0.5/11 of the area in from the corners.
    x_lo, x_hi = L + (R - L) * 0.5 / 11, R - (R - L) * 0.5 / 11
    y_lo, y_hi = B - (B - T) * 0.25 / 5.5, T + (B - T) * 0.25 / 5.5
    c = plot.PALETTE[1]
    assert _near(img, x_lo, y_lo, c, 2) and _near(img, x_hi, y_hi, c, 2)
    assert not _near(img, L + 2, B - 2, c, 2)


def test_bar_heights_proportional(tmp_path):
    fig = Figure(1, 1, size=(W, H))
    fig.axes(0).bars([1, 2], labels=["a", "b"], color=5)
    img = _save(fig, tmp_path)
    c = plot.PALETTE[5]
    heights = [sum(img.getpixel((x, y)) == c for y in range(img.height)) for x in range(img.width)]
    mid = (L + R) // 2  # bar slots 0 and 1 lie on either side of the middle
    h1, h2 = max(heights[:mid]), max(heights[mid:])
    assert h1 > 20 and abs(h2 - 2 * h1) <= 2
    assert abs(h1 - (B - T) / 2.1) <= 2  # y limits 0 .. 2 + 5% of 2, the baseline unpadded


def test_negative_bar_hangs_from_zero(tmp_path):
    fig = Figure(1, 1, size=(W, H))
    fig.axes(0).bars([-1, 2], color=6)
    img = _save(fig, tmp_path)
    c = plot.PALETTE[6]
    # y limits -1.15 .. 2.15 (5% of the span 3 on both sides), so y = 0 is 2.15/3.3 of the way down.
    zero = T + (B - T) * 2.15 / 3.3
    mid = (L + R) // 2
    cols = [[y for y in range(img.height) if img.getpixel((x, y)) == c] for x in range(img.width)]
    neg, pos = max(cols[:mid], key=len), max(cols[mid:], key=len)
    assert abs(neg[0] - zero) <= 1 and abs(pos[-1] - zero) <= 1  # both bars meet the zero line
    assert abs(len(neg) - (B - T) / 3.3) <= 2 and abs(len(pos) - 2 * (B - T) / 3.3) <= 2


def test_nan_and_empty_do_not_crash(tmp_path):
    fig = Figure(1, 3, size=(W, H))
    ax = fig.axes(0)
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 4)
    ax.line([0, 1, 2, 3, 4], [0, 1, math.nan, 3, 4], color=2)
    ax.scatter([math.inf, 1], [1, math.nan])
    ax.vline(math.nan, "nan")
    b = fig.axes(1)
    b.line([], [])
    b.bars([math.nan, 1.0, math.inf])
    fig.axes(2).heatmap([[math.nan, 1.0], [2.0, math.inf]])
    img = _save(fig, tmp_path)
    c = plot.PALETTE[2]
    at = lambda v: (L + (R - L) * v / 4, B - (B - T) * v / 4)  # data (v, v) in pixels
    assert _near(img, *at(0.5), c, 1) and _near(img, *at(3.5), c, 1)
    assert not _near(img, *at(2.0), c, 2)  # the NaN point breaks the line: no segment from 1 to 3


def test_log_axis(tmp_path):
    fig = Figure(1, 1, size=(W, H))
    ax = fig.axes(0)
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 100)
    ax.logy()
    ax.scatter([0.5, 0.25], [10, -1.0], color=4)  # 10 sits half way up a 1..100 log axis; -1 is skipped
    img = _save(fig, tmp_path)
    assert _near(img, (L + R) / 2, (T + B) / 2, plot.PALETTE[4], 1)


def test_heatmap_colours(tmp_path):
    fig = Figure(1, 1, size=(W, H))
    fig.axes(0).heatmap([[0.0, 1.0], [1.0, 0.0]])
    img = _save(fig, tmp_path)
    low, high = (68, 1, 84), (253, 231, 37)  # viridis end points
    q = lambda i, j: img.getpixel((round(L + (R - L) * (j + 0.5) / 2), round(T + (B - T) * (i + 0.5) / 2)))
    assert q(0, 0) == low and q(1, 1) == low and q(0, 1) == high and q(1, 0) == high


def test_save_is_atomic(tmp_path, monkeypatch):
    fig = Figure(1, 1)
    fig.axes(0).line([0, 1], [1, 0])
    out = tmp_path / "sub" / "a.png"
    fig.save(str(out))
    assert os.listdir(out.parent) == ["a.png"]  # no temp file left behind
    before = out.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError):
        fig.save(str(out))
    assert os.listdir(out.parent) == ["a.png"] and out.read_bytes() == before  # old file intact


def test_nice_ticks():
    assert plot.nice_ticks(-1.1, 1.1) == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert plot.nice_ticks(0, 1) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert plot.nice_ticks(0, 7) == pytest.approx([0.0, 2.0, 4.0, 6.0])
    # Neighbouring nice steps differ by up to 2x, so 4-6 ticks is the aim and 3-7 the guarantee
    # (e.g. -3.3..12.9: step 2.5 gives 7 ticks, step 5 gives 3).
    for lo, hi in [(-3.3, 12.9), (1e-4, 9e-4), (100, 123456), (-0.05, 0.05), (0.9, 1.1), (-7e6, -2e6)]:
        ticks = plot.nice_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert 3 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks)
        assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5, 10))
        assert all(abs(t / step - round(t / step)) < 1e-6 for t in ticks)  # multiples of the step


def test_bad_input_messages():
    fig = Figure(1, 2)
    with pytest.raises(ValueError, match="index 2"):
        fig.axes(2)
    with pytest.raises(ValueError, match="2 x values but 1 y"):
        fig.axes(0).line([0, 1], [0])


def test_demo_cli(tmp_path):
    out = tmp_path / "demo.png"
    here = os.path.join(os.path.dirname(__file__), "..")
    subprocess.run([sys.executable, "plot.py", str(out)], cwd=here, check=True, capture_output=True)
    assert Image.open(out).size == (2 * 640, plot.TITLE_H + 2 * 360)

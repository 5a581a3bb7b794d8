"""Pillow-only plotting: line, scatter, bar and heatmap panels saved as PNG figures.

The project does not depend on matplotlib, so its figures (loss curves, MoE routing histograms, RoPE
frequency plots) are drawn here with pillow alone. A Figure is a grid of panels. Each panel's Axes only
records what to draw; everything is rendered in Figure.save(), so axis limits can use all of the data.

    fig = Figure(1, 2, title="training")
    ax = fig.axes(0, "step", "loss")
    ax.line(steps, losses, label="train")
    fig.save("out/loss.png")

Layout, in pixels, of the panel whose top-left corner is (px, py): the plot area spans x from px + LEFT
to px + W - RIGHT and y from py + TOP to py + H - BOTTOM, with the x limits landing exactly on the left
and right edges and the y limits on the bottom and top edges. Panels start below a TITLE_H band when
the figure has a title. Auto limits leave PAD of the data span free on each side. NaN/inf are skipped.

Run `python plot.py out.png` to draw a demo figure.
"""
import argparse
import math
import os
import tempfile

from PIL import Image, ImageDraw, ImageFont

LEFT, RIGHT, TOP, BOTTOM, TITLE_H = 64, 16, 28, 44, 32
PAD = 0.05
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
           (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
INK, GRID, GUIDE, MISSING = (40, 40, 40), (228, 228, 228), (90, 90, 90), (200, 200, 200)
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1 only has the small fixed bitmap font
        return ImageFont.load_default()


def _floats(values, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"plot: {what} must be a sequence of numbers ({e})") from None


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick positions (steps of 1, 2, 2.5 or 5 times 10^k) inside [lo, hi], about `target` of them."""
    if not hi > lo:
        return [lo]
    mag = 10 ** math.floor(math.log10((hi - lo) / target))
    best = []
    for step in (m * mag for m in (0.5, 1, 2, 2.5, 5, 10, 20)):
        ks = range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)
        if not best or abs(len(ks) - target) < abs(len(best) - target):
            best = [k * step for k in ks]
    return best


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis, as log10 positions: powers of ten, or 1-2-5 steps when few decades show."""
    lo, hi = min(lo, hi), max(lo, hi)
    for mants in ((1,), (1, 2, 5), (1, 2, 3, 5, 7)):
        ticks = [k + math.log10(m) for k in range(math.floor(lo), math.ceil(hi) + 1) for m in mants]
        ticks = [x for x in ticks if lo - 1e-9 <= x <= hi + 1e-9]
        if len(ticks) >= 3:
            return ticks[:: math.ceil(len(ticks) / 7)]
    return nice_ticks(lo, hi)


def _fmt(v: float, step: float) -> str:
    """Tick label with just enough decimals to tell neighbouring ticks `step` apart."""
    if abs(v) < abs(step) * 1e-6:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.3g}"
    digits = max(0, -math.floor(math.log10(abs(step)) + 1e-9)) if step else 3
    while digits < 8 and abs(float(f"{v:.{digits}f}") - v) > abs(step) * 1e-6:
        digits += 1
    return f"{v:.{digits}f}"


def _limits(values: list[float], pad_lo=True, pad_hi=True) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return lo - (abs(lo) / 2 or 1), hi + (abs(hi) / 2 or 1)
    span = hi - lo
    return lo - PAD * span * pad_lo, hi + PAD * span * pad_hi


def _cmap(t: float) -> tuple:
    """Viridis-like colour for t in [0, 1] (linear between five anchors)."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b, f = VIRIDIS[i], VIRIDIS[i + 1], t - i
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _labels(draw, font, items, y=None, x=None):
    """Text at (position, text) pairs: centred under a row at height y, or right-aligned left of x.
    Labels that would overlap the previously drawn one are skipped, so crowded axes stay readable."""
    last = -1e9
    for pos, text in items:
        text = str(text)
        w = draw.textlength(text, font=font)
        start, size = (pos - w / 2, w) if y is not None else (pos - 7, 10)
        if text and start > last + 4:
            draw.text((start, y) if y is not None else (x - w, start), text, fill=INK, font=font)
            last = start + size


class Axes:
    """One panel. Methods record data; Figure.save() draws it inside the plot area `box`."""

    def __init__(self, box: tuple, xlabel: str, ylabel: str):
        self.box, self.xlabel, self.ylabel = box, xlabel, ylabel  # box: (left, top, right, bottom) pixels
        self.items = []  # (kind, xs, ys, label, rgb), kind in line/scatter/bars/vline/hline
        self.bar_labels = self.matrix = self.row_labels = self.col_labels = self.xlim = self.ylim = None
        self.log = False

    def _add(self, kind, xs, ys, label, color):
        xs, ys = _floats(xs, f"{kind} x"), _floats(ys, f"{kind} y")
        if len(xs) != len(ys) and kind in ("line", "scatter"):
            raise ValueError(f"plot: {kind} got {len(xs)} x values but {len(ys)} y values")
        rgb = PALETTE[color % len(PALETTE)] if isinstance(color, int) else tuple(color)
        self.items.append((kind, xs, ys, label, rgb))

    def line(self, xs, ys, label=None, color=0):
        self._add("line", xs, ys, label, color)

    def scatter(self, xs, ys, label=None, color=0):
        self._add("scatter", xs, ys, label, color)

    def vline(self, x, label=None):
        self._add("vline", [x], [], label, GUIDE)

    def hline(self, y, label=None):
        self._add("hline", [], [y], label, GUIDE)

    def bars(self, values, labels=None, color=0):
        values = _floats(values, "bars")
        self._add("bars", range(len(values)), values, None, color)
        self.bar_labels = None if labels is None else list(labels)

    def heatmap(self, matrix, row_labels=None, col_labels=None):
        self.matrix = [_floats(row, "heatmap row") for row in matrix]
        self.row_labels, self.col_labels = row_labels, col_labels

    def set_xlim(self, lo, hi):
        self.xlim = (float(lo), float(hi))

    def set_ylim(self, lo, hi):
        self.ylim = (float(lo), float(hi))

    def logy(self):
        self.log = True

    def _ty(self, y: float) -> float:
        """y as plotted: log10(y) on a log axis, where non-positive values become NaN and are skipped."""
        return (math.log10(y) if y > 0 else math.nan) if self.log else y

    def _limits(self):
        """(x0, x1), (y0, y1) in plotted coordinates: the set limits, else the data's plus padding."""
        xs = [x for k, x_, _, _, _ in self.items if k != "hline" for x in x_ if math.isfinite(x)]
        ys = [self._ty(y) for k, _, y_, _, _ in self.items if k != "vline" for y in y_]
        ys = [y for y in ys if math.isfinite(y)]
        n_bars = max([len(y_) for k, _, y_, _, _ in self.items if k == "bars"], default=0)
        xl, yl = _limits(xs), _limits(ys)
        if n_bars:  # bar slots are x = 0..n-1 and bars grow from 0, which gets no padding
            xl = (min([-0.6] + xs), max([n_bars - 0.4] + xs))
            if not self.log:
                yl = _limits(ys + [0.0], pad_lo=min(ys + [0.0]) < 0, pad_hi=max(ys + [0.0]) > 0)
        if self.ylim:
            yl = (self._ty(self.ylim[0]), self._ty(self.ylim[1]))
        return self.xlim or xl, yl

    def _render(self, img: Image.Image, font):
        """Axis titles, grid, tick labels, then data clipped to the plot area, the frame and the legend."""
        draw = ImageDraw.Draw(img)
        l, t, r, b = self.box
        if self.xlabel:
            draw.text(((l + r - draw.textlength(self.xlabel, font=font)) / 2, b + 24), self.xlabel, fill=INK, font=font)
        if self.ylabel:  # horizontal, above the plot area: easier to read than rotated text
            draw.text((l - LEFT + 8, t - 20), self.ylabel, fill=INK, font=font)
        if self.matrix is not None:
            return self._heatmap(draw, font)
        (x0, x1), (y0, y1) = self._limits()
        x1, y1 = (x1 if x1 != x0 else x0 + 1), (y1 if y1 != y0 else y0 + 1)
        X = lambda x: min(max((x - x0) / (x1 - x0) * (r - l), -1e5), 1e5)  # pixels from the plot area's left
        Y = lambda ty: min(max((ty - y1) / (y0 - y1) * (b - t), -1e5), 1e5)  # ... from its top; ty is plotted y
        yticks = _log_ticks(y0, y1) if self.log else nice_ticks(min(y0, y1), max(y0, y1))
        xticks = nice_ticks(min(x0, x1), max(x0, x1))
        ystep, xstep = [tk[1] - tk[0] if len(tk) > 1 else 1.0 for tk in (yticks, xticks)]
        for ty in yticks:
            draw.line([(l, t + Y(ty)), (r, t + Y(ty))], fill=GRID)
        ytexts = [f"{10 ** ty:.3g}" if self.log else _fmt(ty, ystep) for ty in yticks]
        _labels(draw, font, sorted(zip([t + Y(ty) for ty in yticks], ytexts)), x=l - 6)
        if self.bar_labels is None:
            for tx in xticks:
                draw.line([(l + X(tx), t), (l + X(tx), b)], fill=GRID)
            _labels(draw, font, [(l + X(tx), _fmt(tx, xstep)) for tx in xticks], y=b + 5)
        else:
            _labels(draw, font, [(l + X(i), s) for i, s in enumerate(self.bar_labels)], y=b + 5)
        # Data go on a transparent layer the size of the plot area, so whatever falls outside is clipped.
        layer = Image.new("RGBA", (r - l + 1, b - t + 1), (0, 0, 0, 0))
        self._data(layer, font, X, Y, base=Y(y0 if self.log else 0.0))
        img.paste(layer, (l, t), layer)
        draw.rectangle([l, t, r, b], outline=INK)
        self._legend(draw, font)

    def _data(self, layer, font, X, Y, base):
        """Draw every item on `layer` (the plot area); X(x), Y(plotted y) give its pixels, bars grow from `base`."""
        d, (w, h) = ImageDraw.Draw(layer), layer.size
        for kind, xs, ys, label, c in sorted(self.items, key=lambda it: it[0] in ("vline", "hline")):
            pts = [(X(x), Y(self._ty(y))) if math.isfinite(x) and math.isfinite(self._ty(y)) else None
                   for x, y in zip(xs, ys)]
            if kind == "line":  # a NaN/inf splits the polyline into separate runs
                run = []
                for p in pts + [None]:
                    if p:
                        run.append(p)
                    elif run:
                        d.line(run, fill=c, width=2) if len(run) > 1 else d.point(run, fill=c)
                        run = []
            elif kind == "scatter":
                for px, py in filter(None, pts):
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
            elif kind == "bars":
                for x, p in zip(xs, pts):
                    if p:
                        x_lo, x_hi = X(x - 0.4), max(X(x + 0.4), X(x - 0.4) + 1)  # at least 1 px wide
                        d.rectangle([x_lo, min(p[1], base), x_hi, max(p[1], base)], fill=c)
            else:  # dashed guide line with its label
                v = X(xs[0]) if kind == "vline" else Y(self._ty(ys[0]))
                if math.isfinite(v):
                    for s in range(0, h if kind == "vline" else w, 9):
                        d.line([(v, s), (v, s + 5)] if kind == "vline" else [(s, v), (s + 5, v)], fill=c)
                    if label:
                        d.text((v + 3, 3) if kind == "vline" else (3, v - 15), str(label), fill=c, font=font)

    def _legend(self, draw, font):
        """Box in the top-right corner of the plot area: a colour swatch and the label of each labelled item."""
        legend = [(str(s), c) for k, _, _, s, c in self.items if s is not None and k not in ("vline", "hline")]
        if not legend:
            return
        w = max(draw.textlength(s, font=font) for s, _ in legend) + 30
        x, y = self.box[2] - w - 6, self.box[1] + 6
        draw.rectangle([x, y, x + w, y + 16 * len(legend) + 6], fill=(255, 255, 255), outline=MISSING)
        for i, (s, c) in enumerate(legend):
            draw.rectangle([x + 5, y + 9 + 16 * i, x + 19, y + 14 + 16 * i], fill=c)
            draw.text((x + 24, y + 5 + 16 * i), s, fill=INK, font=font)

    def _heatmap(self, draw, font):
        """Matrix cells coloured lo..hi (non-finite cells grey), with a small colour bar in the top margin."""
        l, t, r, b = self.box
        m = self.matrix
        n_rows, n_cols = max(len(m), 1), max([len(row) for row in m], default=0) or 1
        finite = [v for row in m for v in row if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        cx, cy = (lambda j: l + (r - l) * j / n_cols), (lambda i: t + (b - t) * i / n_rows)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                fill = _cmap((v - lo) / (hi - lo) if hi > lo else 0.5) if math.isfinite(v) else MISSING
                draw.rectangle([cx(j), cy(i), cx(j + 1), cy(i + 1)], fill=fill)
        draw.rectangle([l, t, r, b], outline=INK)
        cols = self.col_labels if self.col_labels is not None else range(n_cols)
        rows = self.row_labels if self.row_labels is not None else range(len(m))
        _labels(draw, font, [(cx(j + 0.5), s) for j, s in enumerate(cols)], y=b + 5)
        _labels(draw, font, [(cy(i + 0.5), s) for i, s in enumerate(rows)], x=l - 6)
        lo_s, hi_s = f"{lo:.3g}", f"{hi:.3g}"
        x = r - 106 - draw.textlength(hi_s, font=font)
        for k in range(100):
            draw.line([(x + k, t - 18), (x + k, t - 8)], fill=_cmap(k / 99))
        draw.text((x - 6 - draw.textlength(lo_s, font=font), t - 20), lo_s, fill=INK, font=font)
        draw.text((x + 106, t - 20), hi_s, fill=INK, font=font)


class Figure:
    """A rows x cols grid of panels, each `size` = (W, H) pixels, under an optional title."""

    def __init__(self, rows: int = 1, cols: int = 1, title: str = "", size: tuple = (640, 360)):
        self.rows, self.cols, self.title, self.size = rows, cols, title, tuple(size)
        self.title_h = TITLE_H if title else 0
        self._axes: dict[int, Axes] = {}

    def axes(self, index: int, xlabel: str = "", ylabel: str = "") -> Axes:
        """Panel `index` in row-major order (0 is top-left)."""
        if not 0 <= index < self.rows * self.cols:
            raise ValueError(f"plot: axes index {index} outside a {self.rows}x{self.cols} figure")
        if index not in self._axes:
            W, H = self.size
            px, py = (index % self.cols) * W, self.title_h + (index // self.cols) * H
            self._axes[index] = Axes((px + LEFT, py + TOP, px + W - RIGHT, py + H - BOTTOM), xlabel, ylabel)
        return self._axes[index]

    def image(self) -> Image.Image:
        W, H = self.size
        img = Image.new("RGB", (self.cols * W, self.title_h + self.rows * H), (255, 255, 255))
        if self.title:
            draw, big = ImageDraw.Draw(img), _font(16)
            draw.text(((img.width - draw.textlength(self.title, font=big)) / 2, 8), self.title, fill=INK, font=big)
        font = _font(12)
        for ax in self._axes.values():
            ax._render(img, font)
        return img

    def save(self, path: str) -> None:
        save_png(self.image(), path)


def save_png(image: Image.Image, path: str) -> None:
    """Write a PNG atomically: a temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plot-", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main() -> None:
    p = argparse.ArgumentParser(description="Draw a demo figure with the pillow-only plotting helper.")
    p.add_argument("out", nargs="?", default="out/plot_demo.png", help="PNG path to write")
    a = p.parse_args()
    fig = Figure(2, 2, title="plot.py demo: lines, bars, heatmap, log axis")
    xs = [i / 20 for i in range(0, 126)]
    ax = fig.axes(0, "x (radians)", "value")
    ax.line(xs, [math.sin(x) for x in xs], label="sin(x)", color=0)
    ax.line(xs, [math.cos(x) for x in xs], label="cos(x)", color=1)
    ax.vline(math.pi, label="pi")
    ax.hline(0.0)
    ax = fig.axes(1, "expert", "tokens routed")
    ax.bars([120, 80, 95, 30, 150, 60, 110, 75], labels=[f"E{i}" for i in range(8)], color=2)
    ax = fig.axes(2, "expert", "layer")
    ax.heatmap([[math.sin(i + j) ** 2 for j in range(16)] for i in range(6)],
               row_labels=[f"L{i}" for i in range(6)])
    ax = fig.axes(3, "step", "loss (log scale)")
    steps = list(range(1, 201))
    ax.line(steps, [10 * s ** -0.5 for s in steps], label="train", color=3)
    ax.scatter(steps[::20], [11 * s ** -0.5 for s in steps[::20]], label="eval", color=4)
    ax.logy()
    fig.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

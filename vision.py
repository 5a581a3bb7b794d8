"""Llama 4 vision: from an image file to the embeddings that replace `<|patch|>` tokens.

Llama 4 is *early fusion*: an image becomes a run of ordinary token positions in the text
sequence. Three pieces do that, in this file:

1. Preprocessing (pillow, fp32). The image is fitted, without distortion, onto a canvas of
   rows x cols tiles of 336 px (rows * cols <= 16), padded with black, normalized to [-1, 1] and
   cut into tiles. With more than one tile a 336x336 thumbnail of the whole image is appended.
2. The encoder (a ViT, 34 layers x 1408 wide for Scout and Maverick). Each tile is encoded on
   its own: 24x24 = 576 patches of 14x14 px plus a class token that sits LAST. Attention is
   bidirectional and uses a *2D* RoPE (half the rotary pairs turn with the patch's column, half
   with its row). A *pixel shuffle* then folds each 2x2 block of patches into one token
   (576 x 1408 -> 144 x 5632), a 2-layer MLP adapter maps it to 4096 and a linear projector to
   the text width (5120). So every tile costs exactly 144 text positions.
3. Prompt expansion. `<|image_start|>`, the tiles' `<|patch|>` runs with `<|tile_x_separator|>`
   between tiles of a row and `<|tile_y_separator|>` after each row, then `<|image|>`, the
   thumbnail's patches and `<|image_end|>`. Only the `<|patch|>` positions get image features.

References read (not copied): Meta's llama-models `llama4/preprocess.py`, `chat_format.py`,
`vision/{encoder,embedding}.py`; transformers' `models/llama4/` image processor and model.
Where they differ we follow Meta's reference (the code the released model was made with).

Run `python vision.py IMAGE --out tiles.png` to see how an image is tiled.
"""

import argparse
import io
import math
import os
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFile, ImageOps

from plot import save_png

# ----------------------------------------------------------------------------------------------
# 1. Loading and preprocessing
# ----------------------------------------------------------------------------------------------

TILE = 336  # tile side in pixels (= the encoder's image size)
MAX_TILES = 16  # Meta's default max_num_chunks
MAX_IMAGE_PIXELS = 89_478_485  # refuse larger images (pillow's own decompression-bomb warning level)


class ImageError(ValueError):
    """An image we cannot use; the message names the file and the problem."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file object>"))


def load_image(source) -> Image.Image:
    """Open `source` (a path, raw bytes or a binary file object) as an upright 8-bit RGB image.

    - EXIF orientation is applied (as transformers' `load_image` does; Meta's chat format does not).
    - Transparent images (RGBA, LA, PA, P/L/RGB with a transparency key) are composited onto WHITE,
      like both references (Meta pastes RGBA through its alpha mask onto white; HF alpha-composites
      every image with alpha). We use Meta's paste for all of them.
    - 16-bit greyscale ("I;16", "I") is scaled to 8 bits. Both references call pillow's convert,
      which CLIPS at 255 and turns nearly every 16-bit pixel white; we think scaling is what a user
      means. CMYK, L, P, 1, YCbCr, ... go through pillow's `convert("RGB")` like the references.
    Raises ImageError for empty, truncated, undecodable or absurdly large files.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ImageError(f"{name}: no such file")
        if os.path.getsize(source) == 0:
            raise ImageError(f"{name}: file is empty (0 bytes)")
    elif isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageError(f"{name}: no image data (0 bytes)")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: image too large, refusing to decode it ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image pillow can read") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot open image ({e})") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        image.close()
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image too large ({width}x{height} > {MAX_IMAGE_PIXELS} pixels)")
    # Meta's preprocess.py sets pillow's global LOAD_TRUNCATED_IMAGES = True at import, which
    # silently grey-fills truncated files. We want the error, whoever imported what.
    allow_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    except Exception as e:  # pillow raises OSError, SyntaxError, EOFError, zlib.error, ...
        raise ImageError(f"{name}: image data is truncated or corrupt ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        pass
    try:
        return to_rgb(image)
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert mode {image.mode} to RGB ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any pillow mode to 8-bit RGB (see `load_image` for the rules)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit greyscale
        values = np.asarray(image, dtype=np.float64).clip(0, 65535)
        image = Image.fromarray(np.rint(values / 257.0).astype(np.uint8))  # 65535 -> 255
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def choose_canvas(width: int, height: int, max_tiles: int = MAX_TILES, tile: int = TILE):
    """Meta's canvas rule. Returns (rows, cols) with rows * cols <= max_tiles.

    For every canvas the image can be scaled by s = min(canvas_w / width, canvas_h / height)
    without distortion. Take the smallest s >= 1 if any canvas needs no downscale; otherwise the
    largest s (the mildest downscale). Among canvases with that s, take the smallest area.
    Exact fractions: both references compare float32/float64 quotients for equality.
    """
    candidates = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]

    def scale(rc):
        return min(Fraction(rc[1] * tile, width), Fraction(rc[0] * tile, height))

    scales = {rc: scale(rc) for rc in candidates}
    ups = [s for s in scales.values() if s >= 1]
    best = min(ups) if ups else max(scales.values())
    return min((rc for rc, s in scales.items() if s == best), key=lambda rc: rc[0] * rc[1])


def resized_size(width: int, height: int, canvas_w: int, canvas_h: int, tile: int = TILE):
    """Size (w, h) the image is resized to before padding onto the canvas.

    Upscaling is limited: a side already >= `tile` is never enlarged, a smaller one at most to
    `tile` (Meta's `max_upscaling_size`); then fit that box keeping the aspect ratio. The float
    product and floor are as in both references, so sizes agree to the pixel.
    """
    box_w = min(max(width, tile), canvas_w)
    box_h = min(max(height, tile), canvas_h)
    scale_w, scale_h = box_w / width, box_h / height
    if scale_w < scale_h:
        new_w, new_h = box_w, min(math.floor(height * scale_w), box_h)
    else:
        new_w, new_h = min(math.floor(width * scale_h), box_w), box_h
    return max(new_w, 1), max(new_h, 1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) fp32, normalized with mean = std = 0.5 to [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    return (pixels.float() / 255 - 0.5) / 0.5


def preprocess(image: Image.Image, max_tiles: int = MAX_TILES, tile: int = TILE):
    """Tile an image the way Llama 4 was trained.

    Returns (pixels, (rows, cols)): pixels is (rows * cols [+ 1], 3, tile, tile) fp32, tiles in
    row-major order, then the global thumbnail when rows * cols > 1.
    Resizing is pillow's bilinear (with its built-in antialias), as in Meta's reference, which
    hands PIL images to torchvision; transformers resizes uint8 tensors with torchvision's
    antialiased bilinear instead (off by a grey level here and there) and rescales / normalizes
    in bf16 (off by up to ~0.01). We stay in fp32 like Meta.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    image = to_rgb(image)
    width, height = image.size
    rows, cols = choose_canvas(width, height, max_tiles, tile)
    new_w, new_h = resized_size(width, height, cols * tile, rows * tile, tile)
    canvas = Image.new("RGB", (cols * tile, rows * tile), (0, 0, 0))  # black: -1 once normalized
    canvas.paste(image.resize((new_w, new_h), Image.BILINEAR), (0, 0))  # top-left
    x = to_tensor(canvas)  # (3, rows*tile, cols*tile)
    tiles = x.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, tile, tile)
    tiles = tiles.reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:  # the thumbnail squashes the whole image, aspect ratio NOT kept
        thumb = to_tensor(image.resize((tile, tile), Image.BILINEAR))
        tiles = torch.cat([tiles, thumb[None]], dim=0)
    return tiles, (rows, cols)


# ----------------------------------------------------------------------------------------------
# 2. The encoder, adapter and projector
# ----------------------------------------------------------------------------------------------


@dataclass
class VisionArgs:
    image_size: int = 336  # one tile
    patch_size: int = 14  # 24 x 24 patches per tile
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16  # head_dim 88 = 22 x-pairs + 22 y-pairs
    mlp_dim: int = 5632
    pixel_shuffle_ratio: float = 0.5  # 2x2 patches -> 1 token
    adapter_dim: int = 4096  # Meta's output_dim, HF's projector_{input,output}_dim
    text_dim: int = 5120  # projector output = the text model's width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @classmethod
    def debug(cls, text_dim: int = 256) -> "VisionArgs":
        """A tiny encoder that still takes real 336 px tiles and gives 144 tokens per tile."""
        return cls(dim=64, n_layers=2, n_heads=4, mlp_dim=256, adapter_dim=128, text_dim=text_dim)

    @classmethod
    def from_hf(cls, v: dict, text_dim: int) -> "VisionArgs":
        """From an HF `vision_config`. Our adapter has one width; in the released configs projector_input_dim =
        projector_output_dim = vision_output_dim = 4096, and a config where they differ is not Llama 4's."""
        widths = {v.get(k, 4096) for k in ("projector_input_dim", "projector_output_dim", "vision_output_dim")}
        if len(widths) != 1:
            raise ValueError(f"vision_config: projector/adapter widths differ {sorted(widths)}")
        rope = v.get("rope_parameters") or {}
        return cls(image_size=v.get("image_size", 336), patch_size=v.get("patch_size", 14), dim=v["hidden_size"],
                   n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
                   pixel_shuffle_ratio=v.get("pixel_shuffle_ratio", 0.5), adapter_dim=widths.pop(),
                   text_dim=text_dim, rope_theta=rope.get("rope_theta", v.get("rope_theta", 10000.0)),
                   norm_eps=v.get("norm_eps", 1e-5))

    @classmethod
    def from_meta(cls, v: dict, text_dim: int) -> "VisionArgs":
        """From Meta's params.json `vision_args` (sizes as {height, width}; MLP width = mlp_ratio * dim)."""
        side = lambda s: s["height"] if isinstance(s, dict) else s  # noqa: E731
        return cls(image_size=side(v["image_size"]), patch_size=side(v["patch_size"]), dim=v["dim"],
                   n_layers=v["n_layers"], n_heads=v["n_heads"], mlp_dim=int(v["mlp_ratio"] * v["dim"]),
                   pixel_shuffle_ratio=v["pixel_shuffle_ratio"], adapter_dim=v["output_dim"], text_dim=text_dim)

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def patches_per_tile(self) -> int:  # tokens per tile after the pixel shuffle
        return int(self.grid * self.pixel_shuffle_ratio) ** 2


def rope_2d_angles(args: VisionArgs) -> torch.Tensor:
    """Rotation angles (grid^2 + 1, head_dim / 2) for the 2D RoPE, fp32.

    head_dim / 4 frequencies f_i = theta^(-4i / head_dim). Pair i < head_dim/4 turns by
    (x + 1) * f_i, pair head_dim/4 + i by (y + 1) * f_i, for patch p at x = p % grid,
    y = p // grid. The last row is the class token: angle 0 (not rotated).
    """
    head_dim = args.dim // args.n_heads
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    n_freq = head_dim // 4
    freqs = 1.0 / args.rope_theta ** (torch.arange(n_freq).float() * 4 / head_dim)  # (n_freq,)
    p = torch.arange(args.grid**2)
    x, y = (p % args.grid + 1).float(), (p // args.grid + 1).float()
    angles = torch.cat([x[:, None] * freqs, y[:, None] * freqs], dim=-1)  # (grid^2, head_dim/2)
    return torch.cat([angles, torch.zeros(1, head_dim // 2)], dim=0)  # CLS last, unrotated


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (N, T, H, D) by angles given as cos/sin (T, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (N, T, H, D/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Bidirectional multi-head attention, biases on all four projections, 2D RoPE on q and k."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.wq = nn.Linear(args.dim, args.dim, bias=True)
        self.wk = nn.Linear(args.dim, args.dim, bias=True)
        self.wv = nn.Linear(args.dim, args.dim, bias=True)
        self.wo = nn.Linear(args.dim, args.dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q = self.wq(x).view(n, t, self.n_heads, -1)  # (N, T, H, D)
        k = self.wk(x).view(n, t, self.n_heads, -1)
        v = self.wv(x).view(n, t, self.n_heads, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.wo(out.transpose(1, 2).reshape(n, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then + mlp(ln(x))."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args.dim, args.mlp_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, g*g, C) -> (N, (g*r)^2, C/r^2): each s x s block of patches (s = 1/r) becomes one token.

    Tokens stay row-major; the new channel index is (row-in-block, col-in-block, channel),
    the order Meta's two reshape/transpose steps produce.
    """
    n, t, c = x.shape
    g, s = math.isqrt(t), round(1 / ratio)
    x = x.view(n, g // s, s, g // s, s, c)  # (N, row block, row in block, col block, col in block, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, row block, col block, row in block, col in block, C)
    return x.reshape(n, (g // s) ** 2, s * s * c)


class Adapter(nn.Module):
    """Meta's vision_adapter after the pixel shuffle: fc1, GELU, fc2, GELU; no biases."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        in_dim = int(args.dim / args.pixel_shuffle_ratio**2)
        self.fc1 = nn.Linear(in_dim, args.adapter_dim, bias=False)
        self.fc2 = nn.Linear(args.adapter_dim, args.adapter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class VisionModel(nn.Module):
    """Tiles (N, 3, 336, 336) -> features (N, 144, text_dim) for the `<|patch|>` positions.

    Our parameter names and the Hugging Face and Meta checkpoints' are the tables `_BLOCK_KEYS` and
    `_TOP_KEYS` below.
    """

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        n_pos = args.grid**2 + 1
        self.patch_embedding = nn.Linear(3 * args.patch_size**2, args.dim, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(args.dim) * args.dim**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n_pos, args.dim) * args.dim**-0.5)
        self.ln_pre = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.ln_post = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.adapter = Adapter(args)
        self.projector = nn.Linear(args.adapter_dim, args.text_dim, bias=False)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, grid^2, dim): the ViT, class token dropped."""
        a = self.args
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, a.image_size, a.image_size):
            raise ValueError(f"expected pixels (N, 3, {a.image_size}, {a.image_size}), got {tuple(pixels.shape)}")
        pixels = pixels.to(self.patch_embedding.weight.dtype)
        patches = F.unfold(pixels, kernel_size=a.patch_size, stride=a.patch_size)  # (N, 3*14*14, grid^2)
        x = self.patch_embedding(patches.transpose(1, 2))  # (N, grid^2, dim), row-major patches
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding  # (N, grid^2 + 1, dim), CLS LAST
        x = self.ln_pre(x)
        # The 2D RoPE angles are a fixed function of the config, computed here rather than kept in a buffer
        # (a model built on the meta device and then loaded from a checkpoint has no values for buffers).
        angles = rope_2d_angles(a).to(x.device)  # (grid^2 + 1, head_dim / 2)
        cos, sin = angles.cos(), angles.sin()
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.ln_post(x)[:, :-1]  # (N, grid^2, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encode(pixels)  # (N, 576, dim)
        x = pixel_shuffle(x, self.args.pixel_shuffle_ratio)  # (N, 144, 4 * dim)
        return self.projector(self.adapter(x))  # (N, 144, text_dim)


# --- checkpoint key names -> ours --------------------------------------------------------------
# Our names and the checkpoints', one row per parameter (per module in a block: its weight and bias). HF's
# are under `vision_model.` (block J: `vision_model.model.layers.J.`), Meta's under `vision_embeddings.`
# (block J: `vision_embeddings.vision_encoder.transformer.resblocks.J.`); the projector is HF's
# `multi_modal_projector.linear_1.weight`, Meta's `vision_projection.weight`. The last column: how Meta's
# model-parallel shards of a weight join, the torch.cat dim (None = replicated: every shard holds all of it).
# Column-parallel layers split their OUTPUT rows (dim 0, the bias too); row-parallel layers split their
# INPUT columns (dim 1) and keep the bias whole.

_BLOCK_KEYS = [  # in block J
    # ours        HF                          Meta          shards
    ("attn_norm", "input_layernorm",          "ln_1",       None),
    ("attn.wq",   "self_attn.q_proj",         "attn.wq",    0),
    ("attn.wk",   "self_attn.k_proj",         "attn.wk",    0),
    ("attn.wv",   "self_attn.v_proj",         "attn.wv",    0),
    ("attn.wo",   "self_attn.o_proj",         "attn.wo",    1),
    ("mlp_norm",  "post_attention_layernorm", "ln_2",       None),
    ("mlp.fc1",   "mlp.fc1",                  "mlp.c_fc",   0),
    ("mlp.fc2",   "mlp.fc2",                  "mlp.c_proj", 1),
]  # fmt: skip
_TOP_KEYS = [
    ("patch_embedding.weight", "patch_embedding.linear.weight", "vision_encoder.conv1._linear.weight",     0),
    ("class_embedding",        "class_embedding",               "vision_encoder.class_embedding",          None),
    ("positional_embedding",   "positional_embedding_vlm",      "vision_encoder.positional_embedding_vlm", None),
    ("ln_pre.weight",          "layernorm_pre.weight",          "vision_encoder.ln_pre.weight",            None),
    ("ln_pre.bias",            "layernorm_pre.bias",            "vision_encoder.ln_pre.bias",              None),
    ("ln_post.weight",         "layernorm_post.weight",         "vision_encoder.ln_post.weight",           None),
    ("ln_post.bias",           "layernorm_post.bias",           "vision_encoder.ln_post.bias",             None),
    ("adapter.fc1.weight",     "vision_adapter.mlp.fc1.weight", "vision_adapter.mlp.c_fc.weight",          0),
    ("adapter.fc2.weight",     "vision_adapter.mlp.fc2.weight", "vision_adapter.mlp.c_proj.weight",        1),
]  # fmt: skip


def _lookup(key: str, rest: str, layers: str, column: int) -> tuple[str, int | None]:
    """(our name, Meta's shard dim) of `key`, which is `rest` under its checkpoint's vision prefix; `layers`
    is that checkpoint's prefix of the blocks, `column` its column in the tables (1 HF, 2 Meta)."""
    if rest.startswith(layers):  # '<layers>J.<module>.<param>'
        layer, _, tail = rest[len(layers):].partition(".")
        module, _, param = tail.rpartition(".")
        row = next((r for r in _BLOCK_KEYS if r[column] == module), None)
        if layer.isdigit() and row and param in ("weight", "bias"):
            dim = None if param == "bias" and row[3] == 1 else row[3]  # a row-parallel bias is whole
            return f"layers.{layer}.{row[0]}.{param}", dim
    else:
        row = next((r for r in _TOP_KEYS if r[column] == rest), None)
        if row:
            return row[0], row[3]
    raise KeyError(f"unknown vision key {key!r}")


def vision_key_from_hf(key: str) -> str | None:
    """HF `Llama4ForConditionalGeneration` key -> our VisionModel key; None if not a vision key."""
    if key == "multi_modal_projector.linear_1.weight":
        return "projector.weight"
    if not key.startswith("vision_model."):
        return None
    return _lookup(key, key[len("vision_model."):], "model.layers.", 1)[0]


def _from_meta(key: str) -> tuple[str, int | None] | None:
    if key == "vision_projection.weight":
        return "projector.weight", 0
    if not key.startswith("vision_embeddings.") or key.endswith("_extra_state"):
        return None
    return _lookup(key, key[len("vision_embeddings."):], "vision_encoder.transformer.resblocks.", 2)


def vision_key_from_meta(key: str) -> str | None:
    """Meta `consolidated.NN.pth` key -> our VisionModel key; None if not a vision weight."""
    found = _from_meta(key)
    return found[0] if found else None


def vision_meta_shard_dim(key: str) -> int | None:
    """How Meta's model-parallel shards of a vision weight join: the torch.cat dim, or None if every shard
    holds the full tensor (take shard 0). See the tables above."""
    found = _from_meta(key)
    if found is None:
        raise KeyError(f"not a vision weight: {key!r}")
    return found[1]


# ----------------------------------------------------------------------------------------------
# 3. Prompt expansion
# ----------------------------------------------------------------------------------------------

IMAGE_TOKEN_OFFSETS = {"image_start": 80, "image_end": 81, "tile_x_separator": 84,
                       "tile_y_separator": 85, "image": 90, "patch": 92}  # fmt: skip


def image_special_ids(base: int = 200000) -> dict:
    """The image specials as keyword arguments for `image_token_layout`. The real tokenizer has its
    specials at 200000 + offset; the debug tokenizer at 8192 + offset."""
    return {name: base + offset for name, offset in IMAGE_TOKEN_OFFSETS.items()}


def image_token_layout(grid, patches_per_tile: int = 144, *, image_start: int = 200080,
                       image_end: int = 200081, tile_x_separator: int = 200084,
                       tile_y_separator: int = 200085, image: int = 200090, patch: int = 200092) -> list[int]:  # fmt: skip
    """Token ids standing for one image with tile grid (rows, cols), as Meta's chat format writes them."""
    rows, cols = grid
    tokens = [image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                tokens += [patch] * patches_per_tile
                if col < cols - 1:
                    tokens.append(tile_x_separator)
            tokens.append(tile_y_separator)
    # a single tile is its own thumbnail; otherwise this is the global thumbnail's run
    return tokens + [image] + [patch] * patches_per_tile + [image_end]


# ----------------------------------------------------------------------------------------------
# 4. Command line: show how an image is tiled
# ----------------------------------------------------------------------------------------------


def synthetic_image(width: int = 900, height: int = 500) -> Image.Image:
    """A colourful gradient with a grid of circles, to have something to tile."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * xx / width, 255 * yy / height, 128 + 127 * np.sin(xx / 40) * np.cos(yy / 40)], -1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for cx in range(50, width, 100):
        for cy in range(50, height, 100):
            draw.ellipse((cx - 30, cy - 30, cx + 30, cy + 30), outline=(255, 255, 255), width=3)
    return image


def render_tiles(pixels: torch.Tensor, grid, gap: int = 8) -> Image.Image:
    """Picture of the canvas (tiles re-assembled, with gaps) and, to its right, the thumbnail."""
    rows, cols = grid
    tile = pixels.shape[-1]
    as_uint8 = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # undo normalize
    width = cols * (tile + gap) + (tile + 3 * gap if rows * cols > 1 else 0) + gap
    out = Image.new("RGB", (width, rows * (tile + gap) + gap), (90, 90, 90))
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        out.paste(Image.fromarray(as_uint8[i].permute(1, 2, 0).numpy()), (gap + c * (tile + gap), gap + r * (tile + gap)))
    if rows * cols > 1:
        x0 = gap + cols * (tile + gap) + 2 * gap
        out.paste(Image.fromarray(as_uint8[-1].permute(1, 2, 0).numpy()), (x0, gap))
        ImageDraw.Draw(out).text((x0, tile + 2 * gap), "thumbnail", fill=(255, 255, 255))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Show how Llama 4 tiles an image and what tokens it costs.")
    parser.add_argument("image", nargs="?", help="image file (default: a generated 900x500 test image)")
    parser.add_argument("--out", default="tiles.png", help="where to write the picture of the tiles (PNG)")
    parser.add_argument("--max-tiles", type=int, default=MAX_TILES, help="most tiles per image (default 16)")
    parser.add_argument("--debug-encoder", action="store_true",
                        help="also run the tiny random debug encoder on the tiles and print feature shapes")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        image = load_image(args.image) if args.image else synthetic_image()
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pixels, grid = preprocess(image, max_tiles=args.max_tiles)
    rows, cols = grid
    new_w, new_h = resized_size(*image.size, cols * TILE, rows * TILE)
    print(f"image {image.size[0]}x{image.size[1]} -> resized {new_w}x{new_h} on a {cols * TILE}x{rows * TILE} "
          f"canvas = {rows} row(s) x {cols} col(s) of {TILE} px tiles")  # fmt: skip
    print(f"pixels {tuple(pixels.shape)} fp32 in [{pixels.min():.3f}, {pixels.max():.3f}]"
          + (" (last = global thumbnail)" if rows * cols > 1 else ""))  # fmt: skip
    tokens = image_token_layout(grid)
    names = {v: k for k, v in image_special_ids().items()}
    counts = {n: tokens.count(i) for i, n in names.items()}
    print(f"prompt: {len(tokens)} tokens: " + ", ".join(f"{n} x{c}" for n, c in counts.items() if c))
    save_png(render_tiles(pixels, grid), args.out)  # atomically (plot.py)
    print(f"wrote {args.out}")
    if args.debug_encoder:
        torch.manual_seed(0)
        model = VisionModel(VisionArgs.debug()).eval()
        with torch.no_grad():
            encoded = model.encode(pixels)
            features = model(pixels)
        print(f"debug encoder: encode {tuple(encoded.shape)} -> features {tuple(features.shape)}; "
              f"{counts['patch']} <|patch|> tokens = {features.shape[0]} x {features.shape[1]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

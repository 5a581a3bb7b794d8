"""Tests for vision.py against independent references.

Oracles:
- Meta's llama-models `preprocess.py` + `chat_format.py` (fp32; need torchvision): our pixels must
  match within 1e-5 (they match exactly) and our token layout must equal theirs.
- transformers' `Llama4ImageProcessor` (needs torchvision): it resizes uint8 tensors with
  torchvision (not pillow) and rescales/normalizes in bf16, so it is compared with its own
  tolerance: same tile grid and shapes, canvas within 1 grey level before normalization, pixels
  within 0.02 (bf16 + that grey level) after.
- transformers' `Llama4VisionModel` + `Llama4MultiModalProjector`, and Meta's `VisionEmbeddings`
  run on CPU, with random weights loaded into ours through our key mappings (strict).
- Meta's `reshard_mp` for how model-parallel shards of the vision weights join.
- Hand-worked canvas choices and token counts; pillow's own EXIF semantics; 16-bit scaling.
torchvision only runs with the torch in /work/venv-tv: run `/work/venv-tv/bin/python -m pytest`
for the full set; under the global python the torchvision tests skip and the rest run.
"""

import io
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vision  # noqa: E402


def make_image(width, height, mode="RGB", seed=0):
    """Gradients plus noise (so resampling differences show), converted to `mode`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    elif mode == "P":
        image = image.quantize(64)
    elif mode != "RGB":
        image = image.convert(mode)
    return image


# tiny, square, exact tile, just over a tile, wide, very wide, tall, very tall, beyond 16 tiles
SHAPES = [(5, 3), (40, 40), (336, 336), (337, 336), (700, 420), (1000, 200), (3000, 300), (300, 900),
          (100, 2000), (2000, 1500), (1600, 1600)]  # fmt: skip
CASES = [(w, h, "RGB") for w, h in SHAPES] + [(500, 400, "RGBA"), (3000, 300, "P"), (100, 2000, "L"),
                                             (2000, 1500, "CMYK"), (20, 700, "RGBA")]  # fmt: skip


# --- preprocessing vs Meta (fp32, exact) ------------------------------------------------------


def meta_preprocess(image):
    """What Meta's ChatFormat does to one image: convert, tile, append the global thumbnail."""
    from llama_models.llama4.chat_format import convert_image_to_rgb
    from llama_models.llama4.preprocess import ResizeNormalizeImageTransform, VariableSizeImageTransform

    rgb = convert_image_to_rgb(image)
    tiles, aspect = VariableSizeImageTransform(336)(rgb, max_num_chunks=16)
    if tiles.shape[0] > 1:
        tiles = torch.cat([tiles, ResizeNormalizeImageTransform(336, 336)(rgb)[None]])
    return tiles, tuple(aspect)


@pytest.mark.parametrize("width,height,mode", CASES)
def test_preprocess_matches_meta(width, height, mode):
    pytest.importorskip("torchvision")
    image = make_image(width, height, mode)
    want, want_grid = meta_preprocess(image)
    got, grid = vision.preprocess(vision.to_rgb(image))
    assert grid == want_grid  # Meta's aspect_ratio is (rows, cols) too
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_preprocess_matches_meta_with_fewer_tiles():
    pytest.importorskip("torchvision")
    from llama_models.llama4.preprocess import VariableSizeImageTransform

    for width, height, max_tiles in [(700, 420, 4), (3000, 300, 3), (2000, 1500, 1), (100, 2000, 6)]:
        image = make_image(width, height)
        want, want_grid = VariableSizeImageTransform(336)(image, max_num_chunks=max_tiles)
        got, grid = vision.preprocess(image, max_tiles=max_tiles)
        assert grid == tuple(want_grid)
        assert (got[: want.shape[0]] - want).abs().max().item() <= 1e-5


# --- preprocessing vs transformers (bf16, its own tolerance) -------------------------------------


@pytest.mark.parametrize("width,height,mode", [c for c in CASES if c[:2] != (1600, 1600)])
def test_preprocess_close_to_transformers(width, height, mode):
    pytest.importorskip("torchvision")
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    image = make_image(width, height, mode)
    got, (rows, cols) = vision.preprocess(vision.to_rgb(image))
    out = Llama4ImageProcessor()(image, return_tensors="pt")
    assert out["aspect_ratios"].tolist() == [[rows, cols]]
    want = out["pixel_values"]
    assert want.dtype == torch.bfloat16 and want.shape == got.shape
    diff = (got - want.float()).abs()
    assert diff.max().item() <= 0.02 and diff.mean().item() <= 0.003
    # Without its bf16 rescale/normalize it returns the uint8 canvas: within one grey level of ours.
    raw = Llama4ImageProcessor(do_rescale=False, do_normalize=False)(image, return_tensors="pt")["pixel_values"]
    levels = ((got * 0.5 + 0.5) * 255 - raw.float()).abs()
    assert levels.max().item() <= 1.0 + 1e-3 and (levels > 0.5).float().mean().item() < 0.10


# --- canvas rule, worked out by hand -------------------------------------------------------------


@pytest.mark.parametrize(
    "size,grid,resized",
    [
        ((336, 336), (1, 1), (336, 336)),  # fits exactly
        ((100, 50), (1, 1), (336, 168)),  # small: upscaled, but only until the long side is 336
        ((900, 500), (2, 3), (900, 500)),  # 3 cols x 2 rows is the smallest canvas it fits: s = 1008/900
        ((500, 400), (2, 2), (500, 400)),  # s = min(672/500, 672/400) = 1.344, no bigger tie is smaller
        # too big for 16 tiles: s = 0.672 is the best; (3, 4), (3, 5), (4, 4) tie, (3, 4) has least area
        ((2000, 1500), (3, 4), (1344, 1008)),
        ((3000, 300), (1, 9), (3000, 300)),  # 9 x 336 = 3024 >= 3000 with one row
        ((10000, 100), (1, 16), (5376, 53)),  # no upscale fits: widest canvas, floor(100 * 0.5376)
        ((200, 1000), (3, 1), (200, 1000)),  # tall: 3 rows
    ],
)
def test_canvas_rule_by_hand(size, grid, resized):
    assert vision.choose_canvas(*size) == grid
    rows, cols = grid
    assert vision.resized_size(*size, cols * 336, rows * 336) == resized


def test_preprocess_layout_by_hand():
    image = Image.new("RGB", (900, 500), (255, 0, 0))  # pure red, on a 2 x 3 canvas
    pixels, grid = vision.preprocess(image)
    assert grid == (2, 3) and pixels.shape == (7, 3, 336, 336)
    red = torch.tensor([1.0, -1.0, -1.0])[:, None]
    # tile 0 (top-left) is all red; tile 5 (bottom-right) holds columns 672..1007, rows 336..671:
    # image columns 672..899 and rows 336..499 are red, the rest black padding (-1)
    assert torch.equal(pixels[0].flatten(1), red.expand(3, 336 * 336))
    assert torch.equal(pixels[5][:, : 500 - 336, : 900 - 672].flatten(1), red.expand(3, 164 * 228))
    assert (pixels[5][:, 500 - 336 :] == -1).all() and (pixels[5][:, :, 900 - 672 :] == -1).all()
    assert torch.equal(pixels[6].flatten(1), red.expand(3, 336 * 336))  # thumbnail: squashed, no padding


# --- loading: modes, EXIF, bad files ------------------------------------------------------------


def test_rgba_composites_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 255, 0))  # fully transparent blue
    image.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    image.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    got = np.asarray(vision.to_rgb(image))
    assert got[1, 1].tolist() == [255, 255, 255] and got[0, 0].tolist() == [0, 0, 255]
    assert abs(int(got[0, 1, 0]) - 127) <= 1  # 255 * (1 - 128/255)


def test_la_and_p_with_transparency_composite_on_white():
    la = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(vision.to_rgb(la)).tolist() == [[[255] * 3] * 2] * 2
    p = Image.new("P", (2, 2), 3)
    p.info["transparency"] = 3
    assert np.asarray(vision.to_rgb(p)).tolist() == [[[255] * 3] * 2] * 2


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000], [32768, 60000, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(vision.load_image(path))
    assert got.shape == (2, 3, 3)
    assert got[..., 0].tolist() == np.rint(values / 257).astype(int).tolist()  # 65535 -> 255
    assert (got[..., 0] == got[..., 2]).all()


def test_cmyk_and_l_load(tmp_path):
    for mode, ext in [("CMYK", "jpg"), ("L", "png"), ("P", "gif")]:
        path = tmp_path / f"img.{ext}"
        make_image(30, 20, mode).save(path)
        image = vision.load_image(path)
        assert image.mode == "RGB" and image.size == (30, 20)


def test_exif_rotation_is_applied():
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    image = vision.load_image(buf.getvalue())
    assert image.size == (20, 40)  # upright: portrait
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def png_header_only(width, height):
    """A PNG that declares width x height and holds no pixel data: cheap decompression bomb."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_images_raise_clear_errors(tmp_path, monkeypatch):
    # Meta's preprocess.py flips this pillow global at import; we must not depend on it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    good = io.BytesIO()
    make_image(200, 100).save(good, "PNG")
    jpeg = io.BytesIO()
    make_image(200, 100).save(jpeg, "JPEG")
    files = {
        "empty.png": (b"", "empty"),
        "notes.png": (b"this is not an image\n" * 10, "not an image"),
        "truncated.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "bomb.png": (png_header_only(20000, 20000), "too large"),
        "big.png": (png_header_only(10000, 9000), "too large"),  # under pillow's hard limit
    }
    for name, (data, problem) in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(vision.ImageError) as err:
            vision.load_image(path)
        message = str(err.value)
        assert name in message and problem in message and "\n" not in message
        assert isinstance(err.value, ValueError)
    with pytest.raises(vision.ImageError, match="no such file"):
        vision.load_image(tmp_path / "missing.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_load_image_from_file_object():
    buf = io.BytesIO()
    make_image(30, 20, "RGBA").save(buf, "PNG")
    buf.seek(0)
    assert vision.load_image(buf).size == (30, 20)


# --- encoder vs transformers and Meta --------------------------------------------------------------

TINY = dict(image_size=112, patch_size=14, dim=176, n_layers=2, n_heads=2, mlp_dim=704,
            adapter_dim=96, text_dim=80)  # fmt: skip  head_dim 88 like the real model: 22 + 22 pairs


def randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_encoder_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.llama4.configuration_llama4 import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    a = vision.VisionArgs(**TINY)
    # HF sizes the adapter's fc1 input with intermediate_size, so it must equal 4 * dim here
    config = Llama4Config(
        vision_config=dict(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                           intermediate_size=a.mlp_dim, image_size=a.image_size, patch_size=a.patch_size,
                           projector_input_dim=a.adapter_dim, projector_output_dim=a.adapter_dim,
                           vision_output_dim=a.adapter_dim, pixel_shuffle_ratio=0.5,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        text_config=dict(hidden_size=a.text_dim, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=40, vocab_size=64),
    )  # fmt: skip
    config.vision_config._attn_implementation = "eager"
    hf_vision = Llama4VisionModel(config.vision_config).eval()
    hf_proj = Llama4MultiModalProjector(config).eval()
    randomize(hf_vision, 1)
    randomize(hf_proj, 2)
    state = {f"vision_model.{k}": v for k, v in hf_vision.state_dict().items()}
    state["multi_modal_projector.linear_1.weight"] = hf_proj.linear_1.weight
    state["language_model.model.norm.weight"] = torch.ones(3)  # not ours: must map to None
    ours = vision.VisionModel(a).eval()
    mapped = {vision.vision_key_from_hf(k): v for k, v in state.items() if vision.vision_key_from_hf(k)}
    ours.load_state_dict(mapped, strict=True)

    pixels = torch.randn(3, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_proj(hf_vision(pixels).last_hidden_state)
        got = ours(pixels)
    assert got.shape == (3, (a.image_size // 28) ** 2, a.text_dim) == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    with pytest.raises(KeyError, match="vision_model.model.layers.0.bogus.weight"):
        vision.vision_key_from_hf("vision_model.model.layers.0.bogus.weight")


@pytest.fixture(scope="module")
def meta_parallel(tmp_path_factory):
    """A one-process fairscale model-parallel group so Meta's layers build on CPU."""
    pytest.importorskip("fairscale")
    pytest.importorskip("llama_models")
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    started = not dist.is_initialized()
    if started:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mp_started = not fs_init.model_parallel_is_initialized()
    if mp_started:
        fs_init.initialize_model_parallel(1)
    yield
    if mp_started:
        fs_init.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def build_meta_vision(a, monkeypatch):
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear
    from llama_models.llama4.args import Size
    from llama_models.llama4.args import VisionArgs as MetaVisionArgs
    from llama_models.llama4.vision.embedding import VisionEmbeddings

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kw: self)  # its KV caches call .cuda()
    meta_args = MetaVisionArgs(image_size=Size(width=a.image_size, height=a.image_size),
                               patch_size=Size(width=a.patch_size, height=a.patch_size), dim=a.dim,
                               n_layers=a.n_layers, n_heads=a.n_heads, mlp_ratio=a.mlp_dim / a.dim,
                               output_dim=a.adapter_dim, pixel_shuffle_ratio=a.pixel_shuffle_ratio)  # fmt: skip
    embeddings = VisionEmbeddings(meta_args).float().eval()
    projection = ColumnParallelLinear(a.adapter_dim, a.text_dim, bias=False).eval()
    randomize(embeddings, 3)  # Meta leaves many weights as torch.empty
    randomize(projection, 4)
    state = {f"vision_embeddings.{k}": v for k, v in embeddings.state_dict().items()}
    state["vision_projection.weight"] = projection.weight
    return embeddings, projection, state


def test_encoder_matches_meta(meta_parallel, monkeypatch):
    a = vision.VisionArgs(**TINY)
    embeddings, projection, state = build_meta_vision(a, monkeypatch)
    ours = vision.VisionModel(a).eval()
    ours.load_state_dict({vision.vision_key_from_meta(k): v for k, v in state.items()}, strict=True)
    pixels = torch.randn(2, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = projection(embeddings.vision_adapter(embeddings.vision_encoder(pixels[:, None])))
        got = ours(pixels)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert vision.vision_key_from_meta("layers.0.attention.wo.weight") is None


def test_meta_shard_dims_match_meta_reshard(meta_parallel, monkeypatch):
    from llama_models.checkpoint import reshard_mp

    a = vision.VisionArgs(**TINY)
    _, _, state = build_meta_vision(a, monkeypatch)
    gen = torch.Generator().manual_seed(6)
    shards = [{k: torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(2)]
    merged = reshard_mp(shards, size=1, rank=0)
    for key in state:
        dim = vision.vision_meta_shard_dim(key)
        ours = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim=dim)
        assert torch.equal(ours, merged[key]), key


def test_debug_args_give_144_tokens_per_tile():
    a = vision.VisionArgs.debug()
    pixels, grid = vision.preprocess(make_image(700, 420))
    with torch.no_grad():
        features = vision.VisionModel(a)(pixels)
    ids = vision.image_token_layout(grid)
    assert features.shape == (7, 144, a.text_dim)
    assert ids.count(200092) == features.shape[0] * features.shape[1]  # one feature per <|patch|>
    assert vision.VisionArgs().patches_per_tile == 144  # (336 / 14 / 2)^2


# --- prompt expansion -------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4), (1, 5), (3, 1)])
def test_token_layout_matches_meta_chat_format(grid):
    pytest.importorskip("torchvision")
    from llama_models.llama4.args import Size
    from llama_models.llama4.args import VisionArgs as MetaVisionArgs
    from llama_models.llama4.chat_format import ChatFormat, TransformedImage
    from llama_models.llama4.tokenizer import Tokenizer

    meta_args = MetaVisionArgs(image_size=Size(width=336, height=336), patch_size=Size(width=14, height=14),
                               dim=1408, n_layers=34, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                               pixel_shuffle_ratio=0.5)  # fmt: skip
    chat = ChatFormat(Tokenizer.get_instance(), vision_args=meta_args)
    n = grid[0] * grid[1] + (grid[0] * grid[1] > 1)
    want = chat._encode_image(TransformedImage(image_tiles=torch.zeros(n, 3, 336, 336), aspect_ratio=grid))
    assert vision.image_token_layout(grid) == want


def test_whole_image_path_matches_meta_chat_format():
    pytest.importorskip("torchvision")
    from llama_models.llama4.chat_format import ChatFormat
    from llama_models.datatypes import RawMediaItem
    from llama_models.llama4.args import Size
    from llama_models.llama4.args import VisionArgs as MetaVisionArgs
    from llama_models.llama4.tokenizer import Tokenizer

    meta_args = MetaVisionArgs(image_size=Size(width=336, height=336), patch_size=Size(width=14, height=14),
                               dim=1408, n_layers=34, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                               pixel_shuffle_ratio=0.5)  # fmt: skip
    buf = io.BytesIO()
    make_image(700, 420, "RGBA").save(buf, "PNG")
    tokens, images = ChatFormat(Tokenizer.get_instance(), vision_args=meta_args)._encode_content(
        RawMediaItem(data=buf.getvalue()))
    pixels, grid = vision.preprocess(vision.load_image(buf.getvalue()))
    assert vision.image_token_layout(grid) == tokens
    assert (pixels - images[0].image_tiles).abs().max().item() <= 1e-5


def test_token_layout_by_hand():
    ids = vision.image_special_ids(8192)  # the debug tokenizer's numbering
    start, end, xsep, ysep, img, patch = (ids[k] for k in ("image_start", "image_end", "tile_x_separator",
                                                           "tile_y_separator", "image", "patch"))  # fmt: skip
    assert (start, end, xsep, ysep, img, patch) == (8272, 8273, 8276, 8277, 8282, 8284)
    one = vision.image_token_layout((1, 1), **ids)
    assert one == [start, img] + [patch] * 144 + [end]
    layout = vision.image_token_layout((2, 3), **ids)
    # 6 tiles + thumbnail of 144 patches, 2 x-separators per row, one y-separator per row, 3 markers
    assert len(layout) == 7 * 144 + 2 * 2 + 2 + 3
    row = [patch] * 144 + [xsep] + [patch] * 144 + [xsep] + [patch] * 144 + [ysep]
    assert layout == [start] + row + row + [img] + [patch] * 144 + [end]
    assert len(vision.image_token_layout((4, 4))) == 17 * 144 + 4 * 3 + 4 + 3


def test_default_ids_are_the_real_tokenizers():
    pytest.importorskip("tiktoken")
    from llama_models.llama4.tokenizer import Tokenizer

    special = Tokenizer.get_instance().special_tokens
    for name, token_id in vision.image_special_ids().items():
        assert special[f"<|{name}|>"] == token_id


# --- command line ---------------------------------------------------------------------------------


def test_cli_writes_png_and_runs_debug_encoder(tmp_path, capsys):
    src = tmp_path / "wide.png"
    make_image(1000, 200).save(src)
    out = tmp_path / "tiles.png"
    assert vision.main([str(src), "--out", str(out), "--debug-encoder"]) == 0
    text = capsys.readouterr().out
    assert "1 row(s) x 3 col(s)" in text and "(4, 144, 256)" in text
    assert Image.open(out).size[0] > 3 * 336
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert vision.main([str(bad), "--out", str(out)]) == 1
    assert "bad.png" in capsys.readouterr().err


def test_full_size_parameter_count():
    """Scout/Maverick vision tower + projector: 0.872B parameters (facts sheet, counted by transformers)."""
    with torch.device("meta"):
        model = vision.VisionModel(vision.VisionArgs())
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == 0.872

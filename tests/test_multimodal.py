"""Early fusion end to end: our multimodal load and forward against transformers' Llama4ForConditionalGeneration.

A tiny random Llama 4 with a vision tower is saved the way the Hub ships it; we load it with vision=True,
build prompts with the image token layout, and compare the logits with one image and with two.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoint import load_model  # noqa: E402
from vision import image_token_layout  # noqa: E402

IMAGE_TOKEN = 250  # <|patch|> in this tiny vocabulary


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=260, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=64, floor_scale=16,
                use_qk_norm=True, max_position_embeddings=2048)
    vision = dict(hidden_size=88 * 2, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * 88 * 2,  # = pixel-shuffled width, as in the release
                  image_size=336, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=48,
                  projector_output_dim=48, vision_output_dim=48, norm_eps=1e-5)
    cfg = Llama4Config(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                       boi_token_index=251, eoi_token_index=252)
    hf = Llama4ForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("hf_mm")
    hf.save_pretrained(path)
    return hf, path


def _prompt(grids, patches=144):
    ids = [1, 5, 6]
    for g in grids:
        ids += image_token_layout(g, patches, image_start=251, image_end=252, tile_x_separator=253,
                                  tile_y_separator=254, image=255, patch=IMAGE_TOKEN)
        ids += [7, 8]
    return torch.tensor([ids])


@pytest.mark.parametrize("grids", [[(1, 1)], [(1, 2), (1, 1)]], ids=["one image", "two images"])
def test_logits_match_transformers_with_images(hf_checkpoint, grids):
    hf, path = hf_checkpoint
    ours = load_model(path, vision=True)
    ours.args.image_token_id = IMAGE_TOKEN
    n_tiles = sum(a * b + (a * b > 1) for a, b in grids)  # tiles, plus a thumbnail when there are several
    torch.manual_seed(1)
    pixels = torch.randn(n_tiles, 3, 336, 336)
    tokens = _prompt(grids)
    assert int((tokens == IMAGE_TOKEN).sum()) == 144 * n_tiles
    with torch.no_grad():
        expected = hf(input_ids=tokens, pixel_values=pixels).logits
        got = ours(tokens, image_features=ours.encode_images(pixels))
        text_only = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (text_only - expected).abs().max() > 1e-2  # the images really changed the logits


def test_text_only_load_ignores_vision_weights(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = load_model(path)
    assert ours.vision is None
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).logits, atol=1e-4, rtol=0)


def test_generate_with_an_image_matches_transformers(tmp_path):
    """Greedy decoding from a prompt holding a 2x3-tile image (6 tiles + thumbnail) through generate.py,
    token for token against transformers' generate on the same pixels, then the CLI on the same files."""
    import shutil
    import subprocess
    import sys

    from transformers import Llama4Config, Llama4ForConditionalGeneration

    import generate
    import vision
    from tokenizer import Tokenizer, llama_models_tokenizer_path

    pytest.importorskip("llama_models")
    tok = Tokenizer.from_file(llama_models_tokenizer_path())
    torch.manual_seed(0)
    text = dict(vocab_size=tok.n_words, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                num_local_experts=2, attention_chunk_size=256, max_position_embeddings=4096)
    vis = dict(image_size=336, patch_size=14, hidden_size=88, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4 * 88,
               projector_input_dim=32, projector_output_dim=32, vision_output_dim=32)
    hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vis)).eval()
    hf.save_pretrained(tmp_path)
    shutil.copyfile(llama_models_tokenizer_path(), tmp_path / "tokenizer.model")
    image_path = tmp_path / "picture.png"
    vision.synthetic_image(700, 500).save(image_path)

    pixels, grid = vision.preprocess(vision.load_image(image_path))
    # 700x500 fits canvases of >= 3 columns x >= 2 rows of 336 px; the smallest upscale is min(1008/700,
    # 672/500) = 1.344, shared by 2x3 and 2x4: the smaller area wins -> 2 rows x 3 columns, plus a thumbnail.
    assert grid == (2, 3) and pixels.shape[0] == 7
    a = generate.parse_args(["--ckpt", str(tmp_path), "--prompt", "Describe this.", "--chat", "--image", str(image_path)])
    _, layouts = generate.load_images(a, tok)
    prompt = generate.encode_prompt(tok, "Describe this.", a, layouts)
    model = load_model(tmp_path, vision=True)
    with torch.no_grad():
        ours = generate.generate(model, [prompt], 8, temperature=0, image_features=model.encode_images(pixels))[0]
        theirs = hf.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=8,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs

    cli = subprocess.run([sys.executable, "generate.py", "--ckpt", str(tmp_path), "--chat", "--prompt",
                          "Describe this.", "--image", str(image_path), "--temperature", "0",
                          "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == tok.decode([t for t in ours if t not in tok.stop_ids]) + "\n"

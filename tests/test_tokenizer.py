"""Tests for tokenizer.py against Meta's llama-models tokenizer, transformers' converter and tiktoken."""

import base64
import json
import sys
from pathlib import Path

import pytest
import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenizer as tk  # noqa: E402
from tokenizer import StreamDecoder, Tokenizer  # noqa: E402

TEXTS = {
    "english": "The quick brown fox doesn't jump; it's 3.14159 times lazier than 12345 dogs.\n",
    "french": "L'été dernier, nous sommes allés à la plage près de Marseille. C'était très agréable !",
    "german": "Größere Straßenbahnhaltestellen überqueren wir zügig. Übermorgen ist Äpfelfest.",
    "hindi": "भारत एक विशाल देश है। यहाँ अनेक भाषाएँ बोली जाती हैं।",
    "italian": "Perché l'università è chiusa? Però domani sarà aperta alle 9:30.",
    "portuguese": "Não sei se ele já chegou à estação; a informação é confusa.",
    "spanish": "¿Dónde está la biblioteca? ¡El niño comió una piña y jugó al fútbol!",
    "tagalog": "Magandang umaga po! Kumusta ka na? Salamat sa iyong tulong kahapon.",
    "thai": "สวัสดีครับ วันนี้อากาศดีมาก ผมอยากไปเที่ยวทะเล",
    "vietnamese": "Tiếng Việt có dấu: Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "arabic": "مرحبا بالعالم! اللغة العربية جميلة جداً، وتُكتب من اليمين إلى اليسار.",
    "indonesian": "Saya sedang belajar bahasa Indonesia di Jakarta bersama teman-teman.",
    "code": 'def f(x: int) -> dict[str, int]:\n    """Doc."""\n\treturn {"a": x ** 2}  # ok\r\n\nif __name__ == "__main__":\n    print(f(3))\n',
    "emoji": "I ❤️ 🦙s! 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷 — 日本語テキスト、中文文本，한국어 텍스트.",
    "whitespace": "a" + " " * 300 + "b\n\n\n\t\t  \r\n" + "\n" * 100 + "   end   ",
    "specials": "Hi <|begin_of_text|><|header_start|>user<|header_end|>\n\n<|eot|><|patch|><|reserved_special_token_3|>",
    "empty": "",
}


def meta_tokenizer():
    pytest.importorskip("llama_models")
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer.get_instance()


@pytest.fixture(scope="module")
def meta():
    return meta_tokenizer()


@pytest.fixture(scope="module")
def tok():
    path = tk.llama_models_tokenizer_path()
    if path is None:
        pytest.skip("llama-models (which ships tokenizer.model) is not installed")
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, meta):
    """A tokenizer.json made from tokenizer.model the way the Hub's was made (takes ~5 s)."""
    pytest.importorskip("transformers")
    pytest.importorskip("blobfile")
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    out = tmp_path_factory.mktemp("hf_tokenizer")
    convert_tiktoken_to_fast(meta.model, str(out))
    return out


# -- vocabulary and special tokens -----------------------------------------------------------------

def test_special_tokens_match_meta(tok, meta):
    assert tok.special_tokens == meta.special_tokens
    assert tok.n_words == tok.vocab_size == meta.n_words == 202_048
    # published ids (llama4-facts.md / the Hub config)
    assert (tok.bos_id, tok.eos_id, tok.header_start_id, tok.header_end_id) == (200000, 200001, 200005, 200006)
    assert (tok.eom_id, tok.eot_id, tok.pad_id) == (200007, 200008, 200018)
    assert (tok.image_start_id, tok.image_end_id) == (200080, 200081)
    assert (tok.tile_x_separator_id, tok.tile_y_separator_id) == (200084, 200085)
    assert (tok.image_id, tok.patch_id) == (200090, 200092)
    assert set(tok.stop_ids) == set(meta.stop_tokens) == {200001, 200007, 200008}
    assert tok.pad_id == meta.pad_id and tok.eot_id == meta.eot_id


def test_bytes_to_unicode_matches_gpt2_table():
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert tk.bytes_to_unicode() == bytes_to_unicode()


# -- encoding equals Meta's ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_matches_meta(tok, meta, name):
    text = TEXTS[name]
    for bos, eos in [(False, False), (True, True)]:
        assert tok.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_are_plain_text_unless_allowed(tok, meta):
    text = TEXTS["specials"]
    safe = tok.encode(text)
    assert not any(i >= tok.n_bpe for i in safe)
    allowed = tok.encode(text, allow_special=True)
    assert allowed == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert {200000, 200005, 200006, 200008, 200092} <= set(allowed)
    assert tok.decode(allowed) == text


def test_multi_megabyte_input_matches_meta(tok, meta):
    # long runs of exactly 25k / 25k+1 / 2x25k+1 chars of both kinds, and one across the 400k window edge
    parts = [TEXTS[k] for k in sorted(TEXTS)] * 40
    parts += ["x" * 25_000, " ", "y" * 25_001, "\n", " " * 25_000, "z", "\t" * 50_001, "w" * 75_002]
    text = "".join(parts)
    text = text + "q" * (400_000 - len(text) - 10_000) + "r" * 30_000 + " "
    text = (text + "".join(TEXTS[k] for k in sorted(TEXTS)) * 2_000 + "🦙" * 30_000)[:3_000_000]
    assert len(text) == 3_000_000
    pieces = list(tk.split_for_tiktoken(text))
    assert "".join(pieces) == text
    meta_pieces = [p for i in range(0, len(text), tk.MAX_ENCODE_CHARS)
                   for p in meta._split_whitespaces_or_nonwhitespaces(text[i : i + tk.MAX_ENCODE_CHARS], 25_000)]
    assert pieces == meta_pieces
    ids = tok.encode(text)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


# -- the Hugging Face tokenizer.json form -----------------------------------------------------------

def test_tokenizer_json_gives_same_ids(tok, hf_dir):
    hf = Tokenizer.from_file(hf_dir / "tokenizer.json")
    assert hf.model._mergeable_ranks == tok.model._mergeable_ranks
    assert hf.special_tokens == tok.special_tokens
    for text in TEXTS.values():
        assert hf.encode(text, bos=True) == tok.encode(text, bos=True)


def test_tokenizer_json_matches_transformers(tok, hf_dir):
    tokenizers = pytest.importorskip("tokenizers")
    fast = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for name in ("english", "thai", "code", "emoji"):
        assert fast.encode(TEXTS[name], add_special_tokens=False).ids == tok.encode(TEXTS[name])


def test_find_looks_in_checkpoint_layouts(tmp_path, tok, hf_dir):
    meta_file = tk.llama_models_tokenizer_path()
    hf_snapshot = tmp_path / "hf"
    (hf_snapshot / "original").mkdir(parents=True)
    (hf_snapshot / "original" / "tokenizer.model").symlink_to(meta_file)
    assert Tokenizer.find(hf_snapshot).encode(TEXTS["german"]) == tok.encode(TEXTS["german"])
    json_only = tmp_path / "json_only"
    json_only.mkdir()
    (json_only / "tokenizer.json").symlink_to(hf_dir / "tokenizer.json")
    assert Tokenizer.find(json_only).encode(TEXTS["hindi"]) == tok.encode(TEXTS["hindi"])


def test_missing_tokenizer_error_names_places(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.find(tmp_path)
    msg = str(e.value)
    for where in ("tokenizer.model", "tokenizer.json", "original"):
        assert where in msg
    assert str(tmp_path / "original" / "tokenizer.json") in msg
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(tmp_path / "nope.model")


def test_bad_files_give_clear_errors(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)) + "garbage\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:257: expected 'base64-token rank'"):
        Tokenizer.from_file(bad)
    few = tmp_path / "few.model"
    few.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(100)))
    with pytest.raises(ValueError, match="single bytes are not tokens"):
        Tokenizer.from_file(few)
    js = tmp_path / "tokenizer.json"
    js.write_text(json.dumps({"model": {"vocab": {"a\u4e00": 0}}}))
    with pytest.raises(ValueError, match="not byte-level BPE"):
        Tokenizer.from_file(js)


# -- chat format equals Meta's ChatFormat --------------------------------------------------------------

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": "Bonjour ! Comment ça va ?"}],
    [{"role": "system", "content": "Be terse."},
     {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": ["And ", "3+3? ", "<|eot|> is text here"]},
     {"role": "assistant", "content": "6"},
     {"role": "tool", "content": '{"result": 42}'}],
]


def meta_chat_format_class():
    """Meta's ChatFormat. Its module imports torchvision for image preprocessing, which the text path
    never uses: without torchvision, import it against a stub and then forget the stubbed modules."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        import types

        before = set(sys.modules)
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        sys.modules.update({m.__name__: m for m in (stub, stub.transforms, stub.transforms.functional)})
        try:
            from llama_models.llama4.chat_format import ChatFormat
        finally:
            for name in set(sys.modules) - before:
                if name.startswith(("torchvision", "llama_models.llama4.chat_format", "llama_models.llama4.preprocess")):
                    del sys.modules[name]
        return ChatFormat
    from llama_models.llama4.chat_format import ChatFormat

    return ChatFormat


@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_chat_format_matches_meta(tok, meta, dialog):
    from llama_models.datatypes import RawMessage, RawTextItem

    def to_meta(m):
        content = m["content"] if isinstance(m["content"], str) else [RawTextItem(text=t) for t in m["content"]]
        return RawMessage(role=m["role"], content=content)

    ChatFormat = meta_chat_format_class()
    messages = DIALOGS[dialog]
    expected = ChatFormat(meta).encode_dialog_prompt([to_meta(m) for m in messages]).tokens
    assert tok.encode_dialog(messages) == expected
    assert tok.encode_dialog(messages, add_generation_prompt=False) == expected[: -len(tok.encode_header("assistant"))]
    assert expected[-4:] == [200005, 140680, 200006, 368]  # <|header_start|>assistant<|header_end|>\n\n


def test_chat_content_accepts_token_id_lists(tok):
    image = [tok.image_start_id, tok.image_id] + [tok.patch_id] * 144 + [tok.image_end_id]
    ids = tok.encode_message("user", [image, "Describe this image."])
    assert ids[: len(tok.encode_header("user"))] == tok.encode_header("user")
    body = ids[len(tok.encode_header("user")) : -1]
    assert body == image + tok.encode("Describe this image.") and ids[-1] == tok.eot_id
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.encode_message("robot", "hi")
    with pytest.raises(ValueError, match="message 0"):
        tok.encode_dialog([{"content": "no role"}])


# -- streaming decoder ----------------------------------------------------------------------------------

def test_stream_decoder_never_splits_characters(tok):
    text = "Thai สวัสดีครับ, CJK 日本語と中文, emoji 🦙👨‍👩‍👧‍👦🇫🇷 and ASCII."
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # some tokens do cut characters
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(StreamDecoder(tok).feed(i) for i in [tok.bos_id]) == "<|begin_of_text|>"


# -- debug vocabulary -----------------------------------------------------------------------------------

def _meta_ranks():
    path = tk.llama_models_tokenizer_path()
    if path is None:
        pytest.skip("llama-models is not installed")
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def test_debug_tokenizer_is_truncated_real_vocab():
    dbg = Tokenizer.debug()
    ranks = _meta_ranks()
    truncated = {t: r for t, r in ranks.items() if r < 8192}
    assert dbg.model._mergeable_ranks == truncated
    assert all(bytes([b]) in truncated for b in range(256))
    assert dbg.n_bpe == 8192 and dbg.n_words == dbg.vocab_size == 10_240
    names = list(meta_tokenizer().special_tokens)  # Meta's names in id order
    assert [dbg.special_tokens[n] for n in names] == [8192 + k for k in range(2048)]
    assert (dbg.bos_id, dbg.eot_id, dbg.patch_id) == (8192, 8192 + 8, 8192 + 92)
    assert set(dbg.stop_ids) == {8193, 8199, 8200}


def test_debug_tokenizer_encodes_like_tiktoken_with_truncated_ranks():
    meta = meta_tokenizer()
    truncated = {t: r for t, r in _meta_ranks().items() if r < 8192}
    specials = {name: 8192 + k for k, name in enumerate(meta.special_tokens)}
    ref = tiktoken.Encoding(name="ref", pat_str=meta.O200K_PATTERN, mergeable_ranks=truncated, special_tokens=specials)
    dbg = Tokenizer.debug()
    for text in TEXTS.values():
        ids = dbg.encode(text)
        assert ids == ref.encode(text, allowed_special=set(), disallowed_special=())
        assert max(ids, default=0) < 8192 and dbg.decode(ids) == text
    assert dbg.encode_dialog(DIALOGS[1])[0] == 8192


def test_truncated_vocab_is_valid_bpe():
    """Every kept multi-byte token must be one merge of two lower-ranked kept tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_debug_tokenizer import truncation_problems

    ranks = _meta_ranks()
    assert truncation_problems(ranks, 8192) == []
    assert truncation_problems(ranks, 200) != []  # would drop single bytes
    # a vocabulary with a token that cannot be built from lower ranks is caught
    toy = {bytes([b]): b for b in range(256)} | {b"abc": 256}
    assert "not one merge" in truncation_problems(toy, 257)[0]


# -- command line -----------------------------------------------------------------------------------------

def test_cli_prints_ids_and_pieces(capsys):
    tk.main(["--debug", "--chat", "Hello 🦙"])
    out = capsys.readouterr().out
    dbg = Tokenizer.debug()
    expected = dbg.encode_dialog([{"role": "user", "content": "Hello 🦙"}])
    assert out.splitlines()[0] == f"{len(expected)} tokens (vocab 10240): {expected}"
    assert "'<|header_start|>'" in out and "'user'" in out

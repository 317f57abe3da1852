"""sdlite's torch-free CLIP tokenizer against transformers' slow CLIPTokenizer (what diffusers uses)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdlite.models.clip_vocab import write_clip_tokenizer
from sdlite.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

# Every test here needs torch: transformers' tokenizer is the reference (torch-free: tests/test_golden.py).
pytestmark = pytest.mark.torch

ASTRONAUT = "a photograph of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]

PLAIN = [
    ASTRONAUT,
    "a cat",
    "A Cat Sitting On A Mat",
    "MASTERPIECE BEST QUALITY",
    "oil painting of a lighthouse at dusk, highly detailed, trending on artstation",
    "portrait of a woman, 85mm, bokeh",
    "cyberpunk city street at night with neon signs",
    "a bowl of fruit",
    "photorealistic render of a vintage car",
    "the quick brown fox jumps over the lazy dog",
    "ultra detailed fantasy castle floating in the sky",
    "watercolor sketch of mountains and a river",
    "lowres, bad anatomy, bad hands, text, error, missing fingers",
    "isometric pixel art of a tiny island",
    "close-up macro shot of a dew drop on a leaf",
    "steampunk airship, brass and copper, volumetric lighting",
    "anthropomorphic fox wearing a suit",
    "unbelievably supercalifragilisticexpialidocious",
]

TRICKY = [
    "",
    " ",
    "   \t\n  ",
    "(masterpiece:1.2), [blurry], {best quality}",
    "((very detailed)), (worst quality:1.4)",
    "don't",
    "it's raining, we're here, they've gone, I'm fine, you'll see, he'd go",
    "IT'S LOUD, DON'T SHOUT",
    "1024x768",
    "3.14 and 2,000,000 and 42nd street",
    "café crème brûlée",
    "Ñandú",
    "naïve résumé",
    "cafe\u0301 composed with a combining accent",
    "東京タワー 夜景",
    "北京烤鸭",
    "한국어 프롬프트",
    "Москва, Красная площадь",
    "Αθήνα ΟΔΟΣ",
    "مرحبا بالعالم",
    "a cat 🐱 with a hat 🎩",
    "👨‍👩‍👧 family emoji with zero width joiners",
    "thumbs up 👍🏽",
    "MiXeD CaSe PrOmPt",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\nhere",
    "   leading and trailing spaces   ",
    "!!!",
    "...,,,;;;",
    "?!",
    "-- -- --",
    "control\x00chars\x07in\x1bthe\x7ftext",
    "zero\u200bwidth\u200dspace\ufeffbom",
    "no\u00a0break\u3000ideographic space",
    "line\u2028separator",
    "replacement \ufffd char",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "<|startoftext|>hello<|endoftext|>",
    "<|ENDOFTEXT|> in capitals",
    "!<|endoftext|>",
    "straße and ſ and 'ſ",
    "İstanbul",
    "fullwidth ＡＢＣ１２３",
    "email@example.com #hashtag $100 50% a&b",
    "path/to/file_name-v2.png",
    "ᾼ and α\u0345 greek iota subscripts",
    "\u0345 alone",
    "ﬁ ligature",
    "x" * 300,
]

LONG = [
    ", ".join(["highly detailed"] * 60),
    " ".join(f"word{i}" for i in range(120)),
    "a " * 100,
    "🐱" * 40,
    "a beautiful landscape with rolling hills, a small village, a river flowing through it, "
    "tall pine trees, snow capped mountains in the distance, dramatic clouds, golden hour lighting, "
    "volumetric fog, ultra realistic, 8k, octane render, unreal engine, trending on artstation, "
    "award winning photograph by a famous photographer, sharp focus, intricate details",
]

ALL_PROMPTS = PLAIN + TRICKY + LONG


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def ours(folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def slow(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder)


def reference_ids(tok, prompts: list[str]) -> np.ndarray:
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int64)


def test_enough_prompts():
    assert len(ALL_PROMPTS) >= 60


def test_folder_files(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"


def test_attributes(ours, slow):
    assert ours.model_max_length == slow.model_max_length == 77
    assert ours.bos_token_id == slow.bos_token_id == 49406
    assert ours.eos_token_id == slow.eos_token_id == 49407
    assert ours.pad_token_id == slow.pad_token_id == 49407


def test_known_ids(ours, slow):
    assert ours.tokenize(ASTRONAUT) == ASTRONAUT_IDS[1:-1]
    row = ours(ASTRONAUT)
    assert row.shape == (1, 77) and row.dtype == np.int64
    assert row[0, :10].tolist() == ASTRONAUT_IDS
    assert (row[0, 10:] == 49407).all()
    assert slow(ASTRONAUT).input_ids == ASTRONAUT_IDS


@pytest.mark.parametrize("prompt", ALL_PROMPTS)
def test_matches_slow_transformers(ours, slow, prompt):
    expected = reference_ids(slow, [prompt])
    np.testing.assert_array_equal(ours(prompt), expected)
    # Untruncated ids too (the slow tokenizer's tokenize + convert_tokens_to_ids).
    assert ours.tokenize(prompt) == slow.convert_tokens_to_ids(slow.tokenize(prompt))


def test_batch(ours, slow):
    got = ours(ALL_PROMPTS)
    assert got.shape == (len(ALL_PROMPTS), 77) and got.dtype == np.int64
    np.testing.assert_array_equal(got, reference_ids(slow, ALL_PROMPTS))
    assert ours([]).shape == (0, 77)


def test_truncation(ours):
    ids = ours.tokenize(LONG[0])
    assert len(ids) > 75
    row = ours(LONG[0])[0]
    assert row[0] == 49406 and row[-1] == 49407
    assert row[1:-1].tolist() == ids[:75]


def test_fast_transformers_agrees_on_plain_prompts(folder, ours):
    fast = transformers.CLIPTokenizerFast.from_pretrained(folder)
    assert fast.model_max_length == 77
    np.testing.assert_array_equal(ours(PLAIN), reference_ids(fast, PLAIN))


def test_sd2_pad_token(tmp_path):
    # SD 2.x pads with "!" (id 0); transformers then also splits "!" out of the text as a special
    # token, which changes ids such as "!!" -> [0, 0]: the runtime must do the same.
    write_clip_tokenizer(tmp_path, pad_token="!")
    ours = CLIPTokenizer.from_folder(tmp_path)
    slow = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.pad_token_id == slow.pad_token_id == 0
    prompts = [ASTRONAUT, "hello!! world!", "!<|ENDOFTEXT|>x", "(masterpiece:1.2)!", ""]
    np.testing.assert_array_equal(ours(prompts), reference_ids(slow, prompts))


def test_missing_vocab_names_the_file(folder, tmp_path):
    (tmp_path / "merges.txt").write_bytes((folder / "merges.txt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"vocab\.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_missing_merges_names_the_file(folder, tmp_path):
    (tmp_path / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        CLIPTokenizer.from_folder(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_folder(tmp_path / "nope")


def test_bad_vocab(folder, tmp_path):
    (tmp_path / "merges.txt").write_bytes((folder / "merges.txt").read_bytes())
    (tmp_path / "vocab.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"vocab\.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_loads_folder_saved_by_transformers(tmp_path):
    # save_pretrained writes the newer layout (AddedToken dicts, added_tokens_decoder).
    write_clip_tokenizer(tmp_path / "src", pad_token="!")
    transformers.CLIPTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "saved")
    ours = CLIPTokenizer.from_folder(tmp_path / "saved")
    slow = transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert (ours.model_max_length, ours.pad_token_id) == (77, 0)
    prompts = [ASTRONAUT, "hello!! world!", "a<|endoftext|>b"]
    np.testing.assert_array_equal(ours(prompts), reference_ids(slow, prompts))

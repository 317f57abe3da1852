"""AUTOMATIC1111 prompt syntax, long prompts, emphasis and clip skip.

Parser expectations come from A1111's documentation (the wiki's "Attention/emphasis", "BREAK keyword" and
"Infinite prompt length" sections and the examples its prompt parser documents). Embedding expectations
are computed here with the PyTorch text encoder (transformers' CLIPTextModel) on the same weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from a1111_reference import encode_chunks

from sdlite.errors import InputError
from sdlite.prompts import parse_prompt, prompt_chunks

# fp32 ONNX against fp32 PyTorch: kernel order only (~1e-6 per op); the emphasis rescale and numpy's
# LayerNorm add rounding of the same size.
EMBED_ATOL = 1e-4

R = 1.1
S = 1 / 1.1

PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * R * R),
            (" ", R),
            ("on", 1.0),
            (" a ", R),
            ("hill", 0.55),
            (", sun, ", R),
            ("sky", R**4),
            (".", R),
        ],
    ),
    ("a (word)", [("a ", 1.0), ("word", R)]),
    ("a ((word))", [("a ", 1.0), ("word", R * R)]),
    ("a [word]", [("a ", 1.0), ("word", S)]),
    ("a [[word]]", [("a ", 1.0), ("word", S * S)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
    ("\\[x\\]", [("[x]", 1.0)]),
    ("back\\\\slash", [("back\\slash", 1.0)]),
    # A backslash that escapes nothing is dropped.
    ("C:\\dir", [("C:dir", 1.0)]),
    # Closing brackets that close nothing stay as text.
    ("unbalanced)", [("unbalanced)", 1.0)]),
    ("a ] b", [("a ] b", 1.0)]),
    ("[unbalanced", [("unbalanced", S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("[a (b", [("a ", S), ("b", R * S)]),
    # A weight needs an open round bracket; otherwise it is text.
    ("word:1.3) x", [("word:1.3) x", 1.0)]),
    ("a: b", [("a: b", 1.0)]),
    ("(a:b)", [("a:b", R)]),
    ("( word : 1.3 )", [(" word ", 1.3)]),
    ("(a:+1.5)", [("a", 1.5)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:1.5) (b:1.5)", [("a", 1.5), (" ", 1.0), ("b", 1.5)]),
    ("(a:1.5)(b:1.5)", [("ab", 1.5)]),
    ("((a:2)[b])", [("a", 2 * R), ("b", S * R)]),
    ("(a [b] c)", [("a ", R), ("b", S * R), (" c", R)]),
    ("[(a:1.2)]", [("a", 1.2 * S)]),
    ("()", []),
    ("", []),
    # BREAK: upper case, a word of its own, with the spaces around it.
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("BREAK a", [("BREAK", -1.0), ("a", 1.0)]),
    ("(a) BREAK (b)", [("a", R), ("BREAK", -1.0), ("b", R)]),
    # sdlite's one deviation: brackets around BREAK leave it a BREAK.
    ("(BREAK)", [("BREAK", -1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSER_CASES, ids=[case[0] or "empty" for case in PARSER_CASES])
def test_parse_prompt(prompt, expected):
    got = parse_prompt(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_documented_weights_are_exact():
    """A1111's own example prints these exact floats (1.3 * 1.1 * 1.1 and 1.1 ** 4, multiplied in order)."""
    got = dict(parse_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[1:8:6])
    assert got == {"house": 1.5730000000000004, "sky": 1.4641000000000006}


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "(a:1..2)"])
def test_weight_that_is_not_a_number(prompt):
    with pytest.raises(InputError, match="not a number"):
        parse_prompt(prompt)


# --- chunks, with a toy tokenizer: one id per word, "," its own id ------------------------------------

BOS, EOS, PAD, COMMA = 1000, 1001, 1002, 999


def _toy_tokenize(text: str) -> list[int]:
    return [COMMA if word == "," else int(word) for word in text.replace(",", " , ").split()]


def _toy_chunks(prompt: str):
    return prompt_chunks(prompt, _toy_tokenize, BOS, EOS, PAD, COMMA)


def _words(start: int, count: int) -> str:
    return " ".join(str(i) for i in range(start, start + count))


def test_empty_prompt_is_one_padding_chunk():
    (chunk,) = _toy_chunks("")
    assert chunk.ids == (BOS, EOS, *[PAD] * 75)
    assert chunk.weights == (1.0,) * 77


def test_75_tokens_fit_one_chunk_76_need_two():
    (one,) = _toy_chunks(_words(0, 75))
    assert one.ids == (BOS, *range(75), EOS)
    first, second = _toy_chunks(_words(0, 76))
    assert first.ids == (BOS, *range(75), EOS)
    assert second.ids == (BOS, 75, EOS, *[PAD] * 74)


def test_chunk_breaks_at_a_comma_within_20_tokens_of_the_end():
    # 60 words, a comma (token 61), then 30 words: the chunk fills at token 75 with its last comma 15
    # tokens from the end, so the 14 words after the comma move to the second chunk.
    first, second = _toy_chunks(_words(0, 60) + " , " + _words(100, 30))
    assert first.ids == (BOS, *range(60), COMMA, EOS, *[PAD] * 14)
    assert second.ids == (BOS, *range(100, 130), EOS, *[PAD] * 45)


def test_comma_further_back_than_20_tokens_is_ignored():
    first, second = _toy_chunks(_words(0, 50) + " , " + _words(100, 40))
    assert first.ids == (BOS, *range(50), COMMA, *range(100, 124), EOS)
    assert second.ids[:18] == (BOS, *range(124, 140), EOS)


def test_break_pads_the_chunk_and_a_leading_break_gives_an_empty_chunk():
    first, second = _toy_chunks("1 2 BREAK 3")
    assert first.ids == (BOS, 1, 2, EOS, *[PAD] * 73)
    assert second.ids == (BOS, 3, EOS, *[PAD] * 74)
    assert len(_toy_chunks("1 BREAK")) == 1
    empty, text = _toy_chunks("BREAK 7")
    assert empty.ids == (BOS, EOS, *[PAD] * 75)
    assert text.ids[:3] == (BOS, 7, EOS)


def test_weights_follow_their_tokens_across_chunks():
    first, second = _toy_chunks(_words(0, 74) + " (5 6:1.5) [7]")
    assert first.weights == (1.0, *[1.0] * 74, 1.5, 1.0)
    assert second.weights[:4] == (1.0, 1.5, S, 1.0)


# --- embeddings against the PyTorch text encoder ----------------------------------------------------------


@pytest.fixture(scope="module")
def torch_text(text_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    source = text_model_dir[0]
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    model = CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def ours(text_model_dir):
    from sdlite import Pipeline

    return Pipeline.load(text_model_dir[1])


def _reference(torch_text, pieces, clip_skip: int = 1, breaks: tuple[int, ...] = ()) -> np.ndarray:
    """A1111's conditioning written out directly: tokenize each (text, weight) piece, cut into 75-token
    chunks (also before each piece index in ``breaks``), encode each chunk, weight, restore the mean,
    concatenate. No commas in these prompts, so the comma rule never applies."""
    tokenizer, model = torch_text
    rows: list[list[tuple[int, float]]] = [[]]
    for index, (text, weight) in enumerate(pieces):
        if index in breaks:
            rows.append([])
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(rows[-1]) == 75:
                rows.append([])
            rows[-1].append((token, weight))
    return encode_chunks(tokenizer, model, rows, clip_skip)


def test_plain_prompt_gives_diffusers_ids_and_last_hidden_state(torch_text, ours):
    tokenizer, model = torch_text
    prompt = "a red circle on a blue background"
    (chunk,) = ours.conditioner.chunks(prompt)
    expected_ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert list(chunk.ids) == expected_ids
    import torch

    with torch.no_grad():
        expected = model(torch.tensor([expected_ids])).last_hidden_state.numpy()
    got = ours.encode_prompt([prompt])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=EMBED_ATOL, rtol=0)


def test_long_prompt_with_emphasis_matches_torch(torch_text, ours):
    prompt = "a photo of (red:1.5) " + "blue " * 90 + "circle [green] ((square))"
    pieces = [("a photo of ", 1.0), ("red", 1.5), (" " + "blue " * 90 + "circle ", 1.0), ("green", S)]
    pieces += [(" ", 1.0), ("square", R * R)]
    parsed = parse_prompt(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in pieces]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in pieces])
    expected = _reference(torch_text, pieces)
    got = ours.encode_prompt([prompt])
    assert got.shape == expected.shape == (1, 154, 32)
    np.testing.assert_allclose(got, expected, atol=EMBED_ATOL, rtol=0)


def test_break_matches_torch(torch_text, ours):
    got = ours.encode_prompt(["a (cat:1.3) BREAK a dog"])
    expected = _reference(torch_text, [("a ", 1.0), ("cat", 1.3), ("a dog", 1.0)], breaks=(2,))
    assert got.shape == (1, 154, 32)
    np.testing.assert_allclose(got, expected, atol=EMBED_ATOL, rtol=0)


def test_comma_rule_on_real_tokens(ours):
    # "circle" and "," are one token each: 70 words, a comma, then 10 words.
    prompt = "circle " * 70 + ", " + "square " * 10
    first, second = ours.conditioner.chunks(prompt)
    circle, comma, square = (ours.tokenizer.tokenize(word)[0] for word in ("circle", ",", "square"))
    eos, pad = ours.tokenizer.eos_token_id, ours.tokenizer.pad_token_id
    assert first.ids[1:73] == (*[circle] * 70, comma, eos)
    assert second.ids[1:12] == (*[square] * 10, eos)
    assert second.ids[12:] == (pad,) * 65


def test_shorter_prompt_is_padded_with_empty_chunks(torch_text, ours):
    long_prompt = "blue " * 100
    got = ours.encode_prompt(["", long_prompt])
    assert got.shape == (2, 154, 32)
    empty = _reference(torch_text, [])
    np.testing.assert_allclose(got[0, :77], empty[0], atol=EMBED_ATOL, rtol=0)
    np.testing.assert_allclose(got[0, 77:], empty[0], atol=EMBED_ATOL, rtol=0)
    np.testing.assert_allclose(got[1:], _reference(torch_text, [(long_prompt, 1.0)]), atol=EMBED_ATOL, rtol=0)


@pytest.mark.parametrize("prompt", ["a red circle on a blue background", "a (red:1.4) circle " + "dot " * 80])
def test_clip_skip_2_is_penultimate_layer_after_final_norm(torch_text, ours, prompt):
    pieces = parse_prompt(prompt)
    got = ours.encode_prompt([prompt], clip_skip=2)
    expected = _reference(torch_text, pieces, clip_skip=2)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=EMBED_ATOL, rtol=0)
    # And it is not just the last layer again.
    assert np.max(np.abs(got - ours.encode_prompt([prompt]))) > 1e-2


def test_clip_skip_beyond_the_layers(ours):
    with pytest.raises(InputError, match="has 2 layers"):
        ours.encode_prompt(["a"], clip_skip=3)
    with pytest.raises(InputError, match="at least 1"):
        ours.txt2img("a", steps=1, clip_skip=0, progress=False)


def test_clip_skip_needs_hidden_states_and_the_norm_file(tiny_onnx, tmp_path):
    import onnx

    from sdlite import Pipeline

    no_norm = tmp_path / "no-norm"
    shutil.copytree(tiny_onnx, no_norm)
    (no_norm / "text_encoder" / "final_layer_norm.npz").unlink()
    # A file the manifest lists is missing: the folder is incomplete, which loading says.
    with pytest.raises(InputError, match="final_layer_norm.npz: missing"):
        Pipeline.load(no_norm)
    # Not listed either (a folder written without it): clip skip 1 works, 2 says what is missing.
    manifest = json.loads((no_norm / "sdlite.json").read_text())
    for variant in manifest["components"]["text_encoder"]:
        variant["files"] = {k: v for k, v in variant["files"].items() if not k.endswith("final_layer_norm.npz")}
    (no_norm / "sdlite.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="final layer norm"):
        Pipeline.load(no_norm).encode_prompt(["a"], clip_skip=2)

    # A folder exported without hidden states (e.g. optimum's default): clip skip 1 works, 2 says why not.
    foreign = tmp_path / "foreign"
    shutil.copytree(no_norm, foreign)
    (foreign / "sdlite.json").unlink()
    graph = foreign / "text_encoder" / "model.onnx"
    model = onnx.load(str(graph))
    kept = [out for out in model.graph.output if not out.name.startswith("hidden_states.")]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(graph))
    pipe = Pipeline.load(foreign)
    assert pipe.encode_prompt(["a"]).shape == (1, 77, 32)
    with pytest.raises(InputError, match="no hidden_states outputs"):
        pipe.encode_prompt(["a"], clip_skip=2)


def test_infotext_has_clip_skip_only_above_1(ours):
    common = dict(steps=1, seed=1, progress=False)
    (plain,) = ours.txt2img("a (red:1.2) circle", **common)
    (skipped,) = ours.txt2img("a (red:1.2) circle", clip_skip=2, **common)
    assert "Clip skip" not in plain.info["parameters"]
    assert ", Clip skip: 2," in skipped.info["parameters"]
    assert skipped.info["parameters"].startswith("a (red:1.2) circle\n")


def test_openvino_engine_reads_the_hidden_states_too(text_model_dir, ours):
    from sdlite import Pipeline

    prompt = "a (red:1.3) circle " + "dot " * 80
    openvino = Pipeline.load(text_model_dir[1], engine="openvino", compute="f32")
    for clip_skip in (1, 2):
        got = openvino.encode_prompt([prompt], clip_skip=clip_skip)
        np.testing.assert_allclose(got, ours.encode_prompt([prompt], clip_skip=clip_skip), atol=EMBED_ATOL, rtol=0)


def test_openvino_text_encoder_in_bf16_is_finite_and_close(text_model_dir, ours):
    """CLIP's causal mask (float32's lowest value, -inf in bf16) is made finite, so the text encoder runs in bf16
    (OpenVINO's default on CPUs that have it) without NaN, close to f32 (8 significant bits: about 1% RMS)."""
    from sdlite import Pipeline

    prompt = "a (red:1.3) circle " + "dot " * 80
    openvino = Pipeline.load(text_model_dir[1], engine="openvino", compute="bf16")
    for clip_skip in (1, 2):
        got = openvino.encode_prompt([prompt], clip_skip=clip_skip)
        expected = ours.encode_prompt([prompt], clip_skip=clip_skip)
        assert np.isfinite(got).all()
        assert float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected**2))) < 0.03


def test_cli_clip_skip(text_model_dir, tmp_path):
    from PIL import Image

    from sdlite.cli import main

    out = tmp_path / "skip.png"
    args = ["generate", "a [blue] circle", "-m", str(text_model_dir[1]), "--steps", "1", "--seed", "3"]
    assert main([*args, "--clip-skip", "2", "-o", str(out), "--quiet"]) == 0
    assert ", Clip skip: 2," in Image.open(out).text["parameters"]
    assert main([*args, "--clip-skip", "0", "-o", str(tmp_path / "bad.png"), "--quiet"]) == 2

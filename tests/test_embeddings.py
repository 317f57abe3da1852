"""Textual-inversion embeddings: both file layouts, conditioning against PyTorch, every engine and
precision, infotext, and one-line errors.

The references are diffusers' own ``load_textual_inversion`` on the same tiny weights (new tokens in the
tokenizer, new rows in the torch embedding table, prompt encoded by the pipeline), and, where emphasis and
chunking come in, transformers' CLIPTextModel with the rows appended to its table, run over chunks built
the way AUTOMATIC1111 builds them.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from a1111_reference import encode_chunks

from sdlite.errors import InputError

# fp32 graph against fp32 PyTorch, as in test_prompts: kernel order and the emphasis rescale only.
EMBED_ATOL = 1e-4
R = 1.1
S = 1 / 1.1


# The files are written by the safetensors package (the convert extra): tests that write them are torch-marked.
def _save(path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def _vectors(count: int, width: int = 32, seed: int = 0) -> np.ndarray:
    # Larger than the tiny model's token rows (std 0.02), so that an embedding visibly moves the output.
    return np.random.default_rng(seed).normal(0.0, 0.3, (count, width)).astype(np.float32)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    """One folder with both layouts: "shinystyle" (A1111, 3 vectors), "glowy" (A1111, 1 vector),
    "<cat-toy>" in learned_embeds.safetensors (diffusers, 1 vector, fp16) and "<tri-toy>" in
    tritoy.safetensors (diffusers, 3 vectors)."""
    folder = tmp_path_factory.mktemp("embeddings")
    _save(folder / "shinystyle.safetensors", {"emb_params": _vectors(3, seed=1)})
    _save(folder / "glowy.safetensors", {"emb_params": _vectors(1, seed=2)})
    (folder / "diffusers").mkdir()
    _save(folder / "diffusers" / "learned_embeds.safetensors", {"<cat-toy>": _vectors(1, seed=3).astype(np.float16)})
    _save(folder / "diffusers" / "tritoy.safetensors", {"<tri-toy>": _vectors(3, seed=4)})
    (folder / "shinystyle.preview.png").write_bytes(b"not an embedding, and ignored")
    return folder


@pytest.fixture(scope="module")
def ours(text_model_dir, emb_dir):
    from sdlite import Pipeline

    return Pipeline.load(text_model_dir[1], embeddings=emb_dir)


@pytest.fixture(scope="module")
def diffusers_pipe(text_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        text_model_dir[0], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_context(pipe, file, token: str | None, prompt: str) -> np.ndarray:
    """diffusers' load_textual_inversion, then the pipeline's own prompt encoding."""
    import torch

    pipe.load_textual_inversion(str(file), token=token)
    try:
        with torch.no_grad():
            context, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
    finally:
        pipe.unload_textual_inversion()
    return context.numpy()


# --- files ----------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_reads_both_layouts_and_dtypes(tmp_path):
    from sdlite.embeddings import read_embedding

    vectors = _vectors(2)
    _save(tmp_path / "a1111.safetensors", {"emb_params": vectors})
    _save(tmp_path / "single.safetensors", {"<thing>": vectors[0]})  # older diffusers: no token axis
    _save(tmp_path / "half.safetensors", {"<half>": vectors.astype(np.float16)})
    found, layout = read_embedding(tmp_path / "a1111.safetensors")
    assert layout == "a1111" and list(found) == ["a1111"]
    np.testing.assert_array_equal(found["a1111"], vectors)
    found, layout = read_embedding(tmp_path / "single.safetensors")
    assert layout == "diffusers" and set(found) == {"<thing>", "single"}
    assert found["<thing>"].shape == (1, 32)
    found, _ = read_embedding(tmp_path / "half.safetensors")
    assert found["<half>"].dtype == np.float32
    np.testing.assert_array_equal(found["<half>"], vectors.astype(np.float16).astype(np.float32))


@pytest.mark.torch
def test_bfloat16_is_widened_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sdlite.embeddings import read_embedding

    vectors = torch.from_numpy(_vectors(3)).to(torch.bfloat16)
    save_file({"emb_params": vectors}, str(tmp_path / "bf.safetensors"))
    found, _ = read_embedding(tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(found["bf"], vectors.float().numpy())


# --- chunking -------------------------------------------------------------------------------------------


def _fake_chunks(prompt: str, vectors: int):
    """Chunks over a toy tokenizer (one id per word) where the word "emb" is an embedding of ``vectors``."""
    from sdlite.prompts import prompt_chunks

    words = {"emb": 1}

    def tokenize(text: str) -> list[int]:
        return [words.setdefault(word, 10 + len(words)) for word in text.split()]

    def embedding_at(tokens, position):
        return (tuple(range(1000, 1000 + vectors)), 1) if tokens[position] == 1 else None

    return prompt_chunks(prompt, tokenize, 0, 2, 3, None, embedding_at=embedding_at)


def test_embedding_takes_a_position_per_vector_with_the_weight_around_it():
    (chunk,) = _fake_chunks("a (emb:1.3) b", 3)
    assert chunk.ids[:7] == (0, 11, 1000, 1001, 1002, 12, 2)
    assert chunk.weights[:7] == pytest.approx((1.0, 1.0, 1.3, 1.3, 1.3, 1.0, 1.0))


def test_embedding_is_never_split_across_chunks():
    first, second = _fake_chunks("w " * 73 + "emb x", 3)  # 73 + 3 > 75: the embedding starts chunk two
    assert first.ids[74:] == (2, 3, 3)
    assert second.ids[:6] == (0, 1000, 1001, 1002, 12, 2)
    (exact,) = _fake_chunks("w " * 72 + "emb", 3)  # 72 + 3 = 75 fits exactly
    assert exact.ids[73:] == (1000, 1001, 1002, 2)


# --- conditioning against PyTorch -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "token", "name", "prompt"),
    [
        ("shinystyle.safetensors", "shinystyle", "shinystyle", "a shinystyle circle on a blue background"),
        ("glowy.safetensors", "glowy", "glowy", "a red glowy square"),
        ("diffusers/learned_embeds.safetensors", None, "<cat-toy>", "a <cat-toy> on a table"),
        ("diffusers/tritoy.safetensors", None, "<tri-toy>", "a photo of <tri-toy> in the snow"),
    ],
    ids=["a1111-3-vectors", "a1111-1-vector", "diffusers-1-vector", "diffusers-3-vectors"],
)
def test_matches_diffusers_load_textual_inversion(ours, diffusers_pipe, emb_dir, file, token, name, prompt):
    # diffusers takes an A1111 file's name from ``token``; a diffusers file names its token itself.
    expected = _diffusers_context(diffusers_pipe, emb_dir / file, token, prompt)
    got = ours.encode_prompt([prompt])
    assert got.shape == expected.shape == (1, 77, 32)
    np.testing.assert_allclose(got, expected, atol=EMBED_ATOL, rtol=0)
    # The embedding mattered: with a plain word in its place the prompt encodes differently.
    assert np.max(np.abs(got - ours.encode_prompt([prompt.replace(name, "thing")]))) > 1e-2


@pytest.fixture(scope="module")
def torch_with_rows(text_model_dir, ours):
    """transformers' tokenizer and CLIPTextModel with every usable embedding's rows appended to the token
    table, at the ids sdlite gives them."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(text_model_dir[0] / "tokenizer")
    model = CLIPTextModel.from_pretrained(text_model_dir[0] / "text_encoder").eval()
    rows = ours.embeddings.rows
    first = ours.embeddings.first_id
    assert first == model.config.vocab_size
    model.resize_token_embeddings(first + len(rows))
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight[first:] = torch.from_numpy(rows)
    return tokenizer, model


def _torch_chunks(torch_with_rows, chunks: list[list[tuple[int, float]]], clip_skip: int = 1) -> np.ndarray:
    """A1111's conditioning of explicit chunks of (id, weight): encode, weight, restore the mean, concatenate."""
    tokenizer, model = torch_with_rows
    return encode_chunks(tokenizer, model, chunks, clip_skip)


def _words(torch_with_rows, text: str, weight: float = 1.0) -> list[tuple[int, float]]:
    return [(t, weight) for t in torch_with_rows[0](text, add_special_tokens=False).input_ids]


def _rows_of(ours, name: str, weight: float = 1.0) -> list[tuple[int, float]]:
    _, embedding, _ = ours.embeddings.find(ours.tokenizer.tokenize(name), 0)
    return [(i, weight) for i in embedding.ids]


def test_emphasis_weights_embedding_positions_like_words(ours, torch_with_rows):
    prompt = "a (shinystyle:1.3) [circle] on ((<cat-toy>))"
    chunk = (
        _words(torch_with_rows, "a ")
        + _rows_of(ours, "shinystyle", 1.3)
        + _words(torch_with_rows, "circle", S)
        + _words(torch_with_rows, " on ")
        + _rows_of(ours, "<cat-toy>", R * R)
    )
    (ids,) = ours.conditioner.chunks(prompt)
    assert list(ids.ids[1 : len(chunk) + 1]) == [t for t, _ in chunk]
    got = ours.encode_prompt([prompt])
    np.testing.assert_allclose(got, _torch_chunks(torch_with_rows, [chunk]), atol=EMBED_ATOL, rtol=0)


def test_embedding_that_does_not_fit_starts_the_next_chunk(ours, torch_with_rows):
    # 73 single-token words leave 2 positions; the 3-vector embedding moves whole to chunk two.
    prompt = "blue " * 73 + "(shinystyle:1.2) circle"
    chunks = [
        _words(torch_with_rows, "blue " * 73),
        _rows_of(ours, "shinystyle", 1.2) + _words(torch_with_rows, " circle"),
    ]
    got = ours.encode_prompt([prompt])
    assert got.shape == (1, 154, 32)
    np.testing.assert_allclose(got, _torch_chunks(torch_with_rows, chunks), atol=EMBED_ATOL, rtol=0)
    # With clip skip 2 too (the rows go through the same layers).
    got = ours.encode_prompt([prompt], clip_skip=2)
    np.testing.assert_allclose(got, _torch_chunks(torch_with_rows, chunks, clip_skip=2), atol=EMBED_ATOL, rtol=0)


def test_names_match_as_tokens_case_insensitively(ours):
    assert ours.conditioner.chunks("a ShinyStyle circle") == ours.conditioner.chunks("a shinystyle circle")
    # A longer word that merely starts with a name is another token run: no match.
    plain = ours.conditioner.chunks("a glowyness")[0].ids
    assert all(i < ours.embeddings.first_id for i in plain)
    # The diffusers file's stem names it as well as its token.
    assert ours.conditioner.chunks("learned_embeds") == ours.conditioner.chunks("<cat-toy>")
    # A token between punctuation is found with a comma right after it ("<cat-toy>," alone would end in
    # the token ">," rather than ">").
    assert ours.conditioner.chunks("<cat-toy>, x") == ours.conditioner.chunks("<cat-toy> , x")


def test_openvino_engine_gives_the_same_conditioning(text_model_dir, emb_dir, ours):
    from sdlite import Pipeline

    openvino = Pipeline.load(text_model_dir[1], engine="openvino", compute="f32", embeddings=emb_dir)
    prompt = "a (shinystyle:1.3) circle with <tri-toy> " + "dot " * 72
    for clip_skip in (1, 2):
        got = openvino.encode_prompt([prompt], clip_skip=clip_skip)
        np.testing.assert_allclose(got, ours.encode_prompt([prompt], clip_skip=clip_skip), atol=EMBED_ATOL, rtol=0)


# --- every engine and precision -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_encoder_variants(text_model_dir, tmp_path_factory):
    """The text encoder in each precision and format sdlite converts to, derived from its fp32 ONNX export."""
    from sdlite.convert.variants import derive

    base = text_model_dir[1] / "text_encoder" / "model.onnx"
    out = tmp_path_factory.mktemp("text-variants")
    variants = {("onnx", "fp32"): base}
    for fmt, precision in [("onnx", "fp16"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "fp16")]:
        variants[(fmt, precision)] = derive(fmt, precision, base, out / f"{fmt}-{precision}")[0]
    variants[("openvino", "int8")] = derive("openvino", "int8", base, out / "openvino-int8")[0]
    return variants


RUNS = [
    ("onnx", "onnx", "fp32"),
    ("onnx", "onnx", "fp16"),
    ("onnx", "onnx", "int8"),
    ("openvino", "onnx", "fp32"),
    ("openvino", "onnx", "int8"),  # OpenVINO reading onnxruntime's int8 graph: dequantization after the lookup
    ("openvino", "openvino", "fp32"),
    ("openvino", "openvino", "fp16"),
    ("openvino", "openvino", "int8"),
]


@pytest.mark.parametrize(("engine", "fmt", "precision"), RUNS, ids=["-".join(run) for run in RUNS])
def test_every_precision_extends_its_token_table(text_model_dir, text_encoder_variants, engine, fmt, precision):
    """Appended rows behave as table rows in every variant: a plain prompt is unchanged, rows copied from
    the table encode like the words they came from, and random rows stay within the variant's own bound."""
    import onnx
    from onnx import numpy_helper

    from sdlite.convert.validate import RELATIVE_RMS_BOUND
    from sdlite.engines import load_engine
    from sdlite.token_table import TokenRows
    from sdlite.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_folder(text_model_dir[1] / "tokenizer")
    first = tokenizer.vocab_size
    fp32 = onnx.load(str(text_encoder_variants[("onnx", "fp32")]))
    (table,) = [numpy_helper.to_array(t) for t in fp32.graph.initializer if t.name.endswith("token_embedding.weight")]
    words = tokenizer.tokenize("red circle dog")
    rows = TokenRows(first, np.concatenate([table[words], _vectors(2, seed=9)]))
    plain = tokenizer(["a red circle dog on blue"])
    copied, random = plain.copy(), plain.copy()
    copied[0, 2:5] = [first, first + 1, first + 2]
    random[0, 2:4] = [first + 3, first + 4]

    def hidden(graph, ids, token_rows=None):
        run = load_engine(graph, engine, compute="f32", edit=token_rows).run({"input_ids": ids})
        return run["last_hidden_state"]

    graph = text_encoder_variants[(fmt, precision)]
    extended = hidden(graph, plain, rows)
    # Equal up to kernel order: OpenVINO may fuse the edited lookup differently (measured: < 1e-6).
    np.testing.assert_allclose(extended, hidden(graph, plain), atol=1e-5, rtol=0)
    if precision == "fp32":
        np.testing.assert_allclose(hidden(graph, copied, rows), extended, atol=1e-5, rtol=0)
    # Against fp32: the variant errs on an embedding's rows as much as on plain words (measured: int8
    # 3.0e-2 vs 2.8e-2, fp16 7e-4 vs 7e-4), and within the bound its export was validated against.
    fp32 = text_encoder_variants[("onnx", "fp32")]

    def relative_rms(got, reference):
        return float(np.sqrt(np.mean((got - reference) ** 2) / np.mean(reference**2)))

    with_rows = relative_rms(hidden(graph, random, rows), hidden(fp32, random, rows))
    words_only = relative_rms(hidden(graph, plain), hidden(fp32, plain))
    assert with_rows <= 1.5 * words_only + 1e-6, (with_rows, words_only)
    assert with_rows < RELATIVE_RMS_BOUND.get(precision, 1e-5)


def test_extended_onnx_is_a_valid_graph(text_model_dir, text_encoder_variants):
    """The wire-level edit writes a graph that onnx's own checker (with shape inference) accepts, for a
    float table and for an int8 table dequantized after the lookup."""
    import onnx

    from sdlite.token_table import TokenRows, extend_onnx_token_table
    from sdlite.tokenizer import CLIPTokenizer

    first = CLIPTokenizer.from_folder(text_model_dir[1] / "tokenizer").vocab_size
    for precision in ("fp32", "int8"):
        path = text_encoder_variants[("onnx", precision)]
        model = onnx.load_from_string(extend_onnx_token_table(path.read_bytes(), TokenRows(first, _vectors(2))))
        onnx.checker.check_model(model, full_check=True)
        before = [node.op_type for node in onnx.load(str(path)).graph.node]
        after = [node.op_type for node in model.graph.node]
        assert after.count("Concat") == before.count("Concat") + 1
        assert len(model.graph.initializer) == len(onnx.load(str(path)).graph.initializer) + 1


# --- infotext, CLI and errors ---------------------------------------------------------------------------


def test_infotext_records_the_embeddings_used(ours, emb_dir):
    (image,) = ours.txt2img("a ShinyStyle circle", negative_prompt="<cat-toy>, blurry", steps=1, seed=1, progress=False)
    shiny = hashlib.sha256((emb_dir / "shinystyle.safetensors").read_bytes()).hexdigest()[:12]
    cat = hashlib.sha256((emb_dir / "diffusers" / "learned_embeds.safetensors").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "shinystyle: {shiny}, <cat-toy>: {cat}"' in image.info["parameters"]
    (plain,) = ours.txt2img("a circle", steps=1, seed=1, progress=False)
    assert "TI hashes" not in plain.info["parameters"]


def test_cli_embeddings(text_model_dir, emb_dir, tmp_path, capsys):
    from PIL import Image

    from sdlite.cli import build_parser, main

    out = tmp_path / "ti.png"
    args = ["generate", "a glowy circle", "-m", str(text_model_dir[1]), "--steps", "1", "--seed", "2", "--quiet"]
    assert main([*args, "--embeddings", str(emb_dir), "-o", str(out)]) == 0
    assert 'TI hashes: "glowy: ' in Image.open(out).text["parameters"]
    # Every generation mode takes the option.
    required = {"img2img": ["--image", "x"], "inpaint": ["--image", "x", "--mask", "m"]}
    required["outpaint"] = ["--image", "x", "--extend", "0,0,8,0"]
    for command, options in required.items():
        assert build_parser().parse_args([command, "p", *options, "--embeddings", "d"]).embeddings == "d"
    capsys.readouterr()
    assert main([*args, "--embeddings", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder not found" in err


def test_errors(text_model_dir, tmp_path):
    from sdlite import Pipeline

    model = text_model_dir[1]
    with pytest.raises(InputError, match="folder not found"):
        Pipeline.load(model, embeddings=tmp_path / "missing")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    _save(corrupt / "good.safetensors", {"emb_params": _vectors(1)})
    (corrupt / "broken.safetensors").write_bytes((corrupt / "good.safetensors").read_bytes()[:-20])
    with pytest.raises(InputError, match=r"broken\.safetensors.*truncated"):
        Pipeline.load(model, embeddings=corrupt)

    other = tmp_path / "other"
    other.mkdir()
    _save(other / "lora.safetensors", {"a.lora_up.weight": _vectors(2), "a.lora_down.weight": _vectors(2)})
    with pytest.raises(InputError, match="not a textual-inversion embedding"):
        Pipeline.load(model, embeddings=other)

    # Files that cannot serve this model fail only when a prompt uses them, each with its reason.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _save(mixed / "sd2style.safetensors", {"emb_params": _vectors(2, width=1024)})
    _save(mixed / "xlstyle.safetensors", {"clip_l": _vectors(1, width=768), "clip_g": _vectors(1, width=1280)})
    (mixed / "oldstyle.pt").write_bytes(b"\x80\x04 not unpickled")
    _save(mixed / "twin.safetensors", {"emb_params": _vectors(1)})
    (mixed / "sub").mkdir()
    _save(mixed / "sub" / "twin.safetensors", {"emb_params": _vectors(1)})
    _save(mixed / "fine.safetensors", {"emb_params": _vectors(1)})
    pipe = Pipeline.load(model, embeddings=mixed)
    assert pipe.embeddings.names() == ["fine"]
    assert pipe.encode_prompt(["a fine circle"]).shape == (1, 77, 32)
    cases = {
        "sd2style": r"vectors 1024 wide \(SD 2\.x\), but this model's text encoder is 32 wide",
        "xlstyle": "SDXL embedding",
        "oldstyle": "pickle",
        "twin": "used by .*twin.safetensors and .*twin.safetensors",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message):
            pipe.encode_prompt([f"a {name} circle"])


def test_width_mismatch_on_the_command_line_is_one_line(text_model_dir, tmp_path, capsys):
    from sdlite.cli import main

    folder = tmp_path / "sd2"
    folder.mkdir()
    _save(folder / "sd2style.safetensors", {"emb_params": _vectors(2, width=1024)})
    args = ["generate", "sd2style", "-m", str(text_model_dir[1]), "--steps", "1", "--quiet"]
    assert main([*args, "--embeddings", str(folder), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1024 wide" in err and "32 wide" in err
    assert not (tmp_path / "x.png").exists()


def test_foreign_folder_without_manifest_takes_embeddings(text_model_dir, emb_dir, tmp_path, ours):
    """Folders written by optimum (no sdlite.json) work too: nothing but the loaded graph changes."""
    from sdlite import Pipeline

    foreign = tmp_path / "foreign"
    shutil.copytree(text_model_dir[1], foreign)
    (foreign / "sdlite.json").unlink()
    pipe = Pipeline.load(foreign, embeddings=emb_dir)
    prompt = "a shinystyle <cat-toy>"
    np.testing.assert_allclose(pipe.encode_prompt([prompt]), ours.encode_prompt([prompt]), atol=1e-6, rtol=0)

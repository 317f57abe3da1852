"""Property-based tests (Hypothesis) for every parser a user's text reaches, torch-free.

Whatever the input, a parser either returns a well-formed value or raises sdlite's own error type with a
message; never another exception. The runs are derandomized with a bounded number of examples, so CI is
repeatable and fast.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdlite.cli import parse_extend, parse_size
from sdlite.errors import InputError
from sdlite.infotext import format_infotext, parse_infotext
from sdlite.manifest import Manifest
from sdlite.prompts import parse_prompt
from sdlite.request import make_request
from sdlite.safetensors_file import read_safetensors_header

# Fixed seed (derandomize) and a bounded number of examples for every property.
PROPERTY = settings(
    derandomize=True, max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROMPT_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(st.text(PROMPT_ALPHABET, max_size=80))
def test_prompt_parser_gives_finite_weights_or_input_error(prompt):
    try:
        pieces = parse_prompt(prompt)
    except InputError:
        return
    for text, weight in pieces:
        assert isinstance(text, str)
        assert math.isfinite(weight)


@PROPERTY
@given(st.text(st.sampled_from("ab ()[]:\\1.2e9BREAK,-"), max_size=40))
def test_prompt_parser_on_syntax_characters(prompt):
    try:
        pieces = parse_prompt(prompt)
    except InputError:
        return
    assert all(math.isfinite(weight) for _, weight in pieces)


_LINE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), max_size=40)
_KEY = st.sampled_from(["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Model hash", "Clip skip", "RNG"])
_VALUE = st.one_of(st.integers(0, 2**64 - 1), st.floats(0.01, 100, allow_nan=False), _LINE.map(str.strip).filter(bool))


@PROPERTY
@given(
    _LINE.filter(lambda s: not s.startswith("Negative prompt:")),
    _LINE,
    st.dictionaries(_KEY, _VALUE, min_size=3, max_size=8),
)
def test_infotext_reads_back_what_was_written(prompt, negative, params):
    text = format_infotext(prompt, negative, params)
    got_prompt, got_negative, got_params = parse_infotext(text)
    assert got_prompt.strip() == prompt.strip()
    assert got_negative.strip() == negative.strip()
    expected = {key: (f"{value:g}" if isinstance(value, float) else str(value)) for key, value in params.items()}
    assert got_params == expected


@PROPERTY
@given(st.text(max_size=200))
def test_infotext_reader_never_fails(text):
    prompt, negative, params = parse_infotext(text)
    assert isinstance(prompt, str) and isinstance(negative, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


@PROPERTY
@given(st.one_of(st.text(max_size=20), st.from_regex(r"-?\d{1,7}[xX]-?\d{1,7}", fullmatch=True)))
def test_size_parser(text):
    try:
        width, height = parse_size(text)
    except InputError:
        return
    assert width % 8 == 0 and height % 8 == 0 and width >= 8 and height >= 8


@PROPERTY
@given(st.one_of(st.text(max_size=20), st.from_regex(r"-?\d{1,6}(,-?\d{1,6}){0,4}", fullmatch=True)))
def test_extend_parser(text):
    try:
        values = parse_extend(text)
    except InputError:
        return
    assert len(values) == 4 and all(isinstance(v, int) for v in values)


@PROPERTY
@given(
    cfg=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.none(), st.text()),
    steps=st.one_of(st.integers(-5, 2000), st.floats(), st.booleans(), st.text(max_size=3)),
    batch=st.one_of(st.integers(-2, 100), st.floats()),
    width=st.one_of(st.integers(-16, 70000), st.none()),
    seed=st.one_of(st.integers(-(2**70), 2**70), st.none(), st.floats()),
    sampler=st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["Euler a", "DPM++ 2M Karras", "heun"])),
)
def test_request_is_checked_or_refused(cfg, steps, batch, width, seed, sampler):
    from tests.scheduler_configs import SD15

    try:
        request = make_request(
            "x",
            cfg_scale=cfg,
            steps=steps,
            batch=batch,
            width=width,
            seed=seed,
            sampler=sampler,
            default_size=(64, 64),
            default_sampler="Euler",
            scheduler_config=SD15,
        )
    except InputError:
        return
    assert math.isfinite(request.cfg_scale) and request.steps >= 1 and request.batch >= 1
    assert request.width % 8 == 0 and 0 <= request.seed < 2**64


@PROPERTY
@given(JSON_VALUES)
def test_manifest_parser_refuses_with_value_error(data):
    try:
        Manifest.from_json(data)
    except ValueError as exc:
        assert str(exc)


_VALID_MANIFEST = {
    "family": "sd15",
    "name": "m",
    "prediction_type": "epsilon",
    "vae_scaling_factor": 0.18215,
    "default_size": [64, 64],
    "components": {"unet": [{"format": "onnx", "precision": "fp32", "attention": "plain", "files": {"a": ""}}]},
}


@PROPERTY
@given(st.sampled_from(sorted(_VALID_MANIFEST)), JSON_VALUES)
def test_manifest_with_one_field_replaced(key, value):
    try:
        Manifest.from_json({**_VALID_MANIFEST, key: value})
    except ValueError as exc:
        assert str(exc)


@pytest.fixture(scope="module")
def header_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("headers")


_HEADER_OBJECTS = st.dictionaries(
    st.text(max_size=6),
    st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16", "I8", "X9", 3]),
                "shape": st.lists(st.integers(-2, 5), max_size=3),
                "data_offsets": st.lists(st.integers(-8, 64), max_size=3),
            }
        ),
    ),
    max_size=3,
)


@settings(PROPERTY, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    header=st.one_of(_HEADER_OBJECTS.map(lambda h: json.dumps(h).encode()), st.binary(max_size=40)),
    declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    data=st.binary(max_size=64),
)
def test_safetensors_header_reader(header_dir, header, declared, data):
    path = header_dir / "x.safetensors"
    length = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + header + data)
    try:
        result = read_safetensors_header(path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(result, dict)

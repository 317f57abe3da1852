"""Weights files as users have them: pickles never run code, lying or truncated safetensors give one line."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from sdlite.cli import main
from sdlite.convert.checkpoint_file import read_safetensors_header, read_state_dict
from sdlite.errors import InputError

# Every test here needs torch: checkpoints written with torch, read by sdlite.convert.
pytestmark = pytest.mark.torch


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if code from the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _error_line(err: str) -> str:
    """The CLI's one error line (other lines on stderr come from third-party import warnings)."""
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def _convert(source, out, *flags) -> int:
    return main(["convert", str(source), str(out), "--quiet", *flags])


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("flags", [(), ("--allow-pickle",)])
def test_malicious_pickle_never_runs(tmp_path, capsys, writer, flags):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "model.ckpt"
    payload = {"state_dict": {"w": torch.zeros(2), "evil": _Payload(marker)}}
    if writer == "torch.save":
        torch.save(payload, ckpt)
    else:
        with open(ckpt, "wb") as fh:
            pickle.dump(payload, fh)
    assert _convert(ckpt, tmp_path / "out", *flags) == 2
    err = _error_line(capsys.readouterr().err)
    assert not marker.exists()
    if flags:
        assert "refused" in err and "could run code" in err
    else:
        assert "--allow-pickle" in err
    assert not (tmp_path / "out").exists()
    # The payload is live: full unpickling does create the marker.
    if writer == "torch.save":
        torch.load(ckpt, weights_only=False)
    else:
        with open(ckpt, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()


def test_allowed_pickle_reads_tensors(tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": {"a": torch.arange(3.0)}, "global_step": 7}, ckpt)
    state = read_state_dict(ckpt, allow_pickle=True)
    assert list(state) == ["a"] and torch.equal(state["a"], torch.arange(3.0))


def _write_raw(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, path)
    return path


def test_valid_header_is_accepted(good_file):
    header = read_safetensors_header(good_file)
    assert header["a"]["shape"] == [4, 4]
    assert torch.equal(read_state_dict(good_file)["a"], torch.ones(4, 4))


def _bad_files(tmp_path, good_file):
    data = good_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    cases = {}

    cases["truncated"] = tmp_path / "truncated.safetensors"
    cases["truncated"].write_bytes(data[: len(data) - 10])

    cases["header_too_long"] = tmp_path / "header_too_long.safetensors"
    _write_raw(cases["header_too_long"], header, body, header_len=len(data) * 4)

    beyond = json.loads(json.dumps(header))
    beyond["b"]["data_offsets"] = [beyond["b"]["data_offsets"][0], len(body) + 1000]
    cases["offsets_beyond_file"] = tmp_path / "beyond.safetensors"
    _write_raw(cases["offsets_beyond_file"], beyond, body)

    lying = json.loads(json.dumps(header))
    lying["a"]["shape"] = [40, 40]
    cases["shape_lies"] = tmp_path / "lying.safetensors"
    _write_raw(cases["shape_lies"], lying, body)

    cases["not_json"] = tmp_path / "not_json.safetensors"
    cases["not_json"].write_bytes(struct.pack("<Q", 5) + b"{nope" + body)

    cases["tiny"] = tmp_path / "tiny.safetensors"
    cases["tiny"].write_bytes(b"\x01\x02")
    return cases


EXPECTED = {
    "truncated": "truncated download",
    "header_too_long": "header length",
    "offsets_beyond_file": "ends at byte",
    "shape_lies": "needs",
    "not_json": "not valid JSON",
    "tiny": "truncated",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_lying_or_truncated_safetensors(tmp_path, good_file, case):
    path = _bad_files(tmp_path, good_file)[case]
    with pytest.raises(InputError, match=EXPECTED[case]):
        read_state_dict(path)


@pytest.mark.parametrize("case", ["truncated", "header_too_long", "offsets_beyond_file"])
def test_corrupt_safetensors_through_the_cli(tmp_path, good_file, capsys, case):
    path = _bad_files(tmp_path, good_file)[case]
    assert _convert(path, tmp_path / "out") == 2
    assert "corrupt safetensors file" in _error_line(capsys.readouterr().err)

"""The conversion journal (what --resume keeps) and the memory plan (what --memory-budget refuses), on their own."""

from __future__ import annotations

import json

import pytest

from sdlite.convert.journal import JOURNAL, Journal, work_dir
from sdlite.convert.memory_plan import GB, check_plan, make_step
from sdlite.errors import InputError

OPTIONS = {"source": "/m", "formats": ["onnx"], "precisions": ["fp32"]}


def test_work_folder_is_a_hidden_sibling(tmp_path):
    assert work_dir(tmp_path / "model") == tmp_path / ".model.sdlite-partial"


def test_finished_step_is_kept_only_while_its_files_are_intact(tmp_path):
    root = tmp_path / ".m.sdlite-partial"
    journal = Journal(root, OPTIONS, resume=False)
    (root / "unet").mkdir()
    graph = root / "unet" / "model.onnx"
    graph.write_bytes(b"graph")
    journal.record("unet/onnx/fp32", [graph], validation=None)

    resumed = Journal(root, OPTIONS, resume=True)
    assert resumed.finished("unet/onnx/fp32")["files"] == {
        "unet/model.onnx": journal.steps["unet/onnx/fp32"]["files"]["unet/model.onnx"]
    }
    graph.write_bytes(b"changed")
    assert resumed.finished("unet/onnx/fp32") is None
    assert resumed.finished("never/ran") is None


def test_fresh_start_replaces_an_old_work_folder(tmp_path):
    root = tmp_path / ".m.sdlite-partial"
    journal = Journal(root, OPTIONS, resume=False)
    (root / "stale").write_text("x")
    journal.record("text_encoder/base", [root / "stale"])
    fresh = Journal(root, OPTIONS, resume=False)
    assert fresh.steps == {} and not (root / "stale").exists()
    assert json.loads((root / JOURNAL).read_text())["steps"] == {}


def test_resume_with_other_options_is_refused(tmp_path):
    root = tmp_path / ".m.sdlite-partial"
    Journal(root, OPTIONS, resume=False)
    with pytest.raises(InputError, match="--resume: .*differs in precisions"):
        Journal(root, {**OPTIONS, "precisions": ["fp16"]}, resume=True)


def test_plan_that_fits_passes_and_one_that_does_not_is_refused():
    steps = [
        make_step("text_encoder", "fp32", "export", int(0.5 * GB)),
        make_step("unet", "openvino w8a8", "w8a8", int(3.4 * GB), latent_cells=64 * 64),
    ]
    largest = max(step.need_bytes for step in steps)
    check_plan(steps, largest, given=True)
    with pytest.raises(InputError, match=r"--memory-budget 2: the unet openvino w8a8 w8a8 step needs about \d"):
        check_plan(steps, 2 * GB, given=True)
    with pytest.raises(InputError, match="GB free now"):
        check_plan(steps, 2 * GB, given=False)
    check_plan(steps, None, given=False)  # where free memory is unknown, nothing is refused

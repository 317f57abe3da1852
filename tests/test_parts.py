"""The part pool's memory policy and observer hooks, torch-free, on the embedded default model."""

from __future__ import annotations

import pytest

from sdlite import Pipeline
from sdlite.engines import ENGINE_FORMATS
from sdlite.errors import InputError
from sdlite.model_folder import ModelFolder
from sdlite.models import default_model_path
from sdlite.parts import PartPool, graph_bytes


def _pool(budget: int | None) -> PartPool:
    folder = ModelFolder.open(default_model_path())
    return PartPool(lambda name: folder.graph(name, ENGINE_FORMATS["onnx"]), "onnx", budget_bytes=budget)


class Recorder:
    """An observer that logs every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def before(self, part: str, action: str) -> None:
        self.events.append(("before", f"{action} {part}"))

    def after(self, part: str, action: str, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("after", f"{action} {part}"))

    def released(self, part: str) -> None:
        self.events.append(("released", part))


def test_graph_bytes_counts_external_data_once(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    (tmp_path / "model.onnx_data").write_bytes(b"x" * 100)
    (tmp_path / "openvino_model.xml").write_bytes(b"x" * 7)
    (tmp_path / "openvino_model.bin").write_bytes(b"x" * 50)
    assert graph_bytes(tmp_path / "model.onnx") == 110
    assert graph_bytes(tmp_path / "openvino_model.xml") == 57


def test_no_budget_keeps_every_part():
    pool = _pool(None)
    for part in ("text_encoder", "unet", "vae_decoder"):
        pool.get(part)
        pool.done(part)
    assert pool.loaded() == ["text_encoder", "unet", "vae_decoder"]
    pool.release()
    assert pool.loaded() == []


def test_zero_budget_releases_each_part_after_use():
    pool = _pool(0)
    recorder = Recorder()
    pool.observers.append(recorder)
    pool.get("unet")
    assert pool.loaded() == ["unet"]
    pool.done("unet")
    assert pool.loaded() == []
    assert recorder.events == [("before", "load unet"), ("after", "load unet"), ("released", "unet")]


def test_budget_releases_the_smallest_idle_part_first():
    sizes = {part: _pool(None).resident_bytes(part) for part in ("text_encoder", "unet", "vae_decoder")}
    # Room for any two parts, not for all three.
    pool = _pool(sum(sizes.values()) - 1)
    for part in ("text_encoder", "unet", "vae_decoder"):
        pool.get(part)
        pool.done(part)
    smallest = min(("text_encoder", "unet"), key=sizes.get)
    assert smallest not in pool.loaded() and len(pool.loaded()) == 2


def test_budget_keeps_the_largest_part_across_generations():
    # A pipeline uses its parts in a cycle; with room for the largest part and one other, the largest is loaded
    # once and the small ones take turns (releasing the least recently used would reload every part every time).
    sizes = {part: _pool(None).resident_bytes(part) for part in ("text_encoder", "unet", "vae_decoder")}
    largest = max(sizes, key=sizes.get)
    budget = sizes[largest] + max(size for part, size in sizes.items() if part != largest)
    pool = _pool(budget)
    recorder = Recorder()
    pool.observers.append(recorder)
    for _ in range(3):
        for part in ("text_encoder", "unet", "vae_decoder"):
            pool.get(part)
            pool.done(part)
            assert sum(sizes[p] for p in pool.loaded()) <= budget
    assert recorder.events.count(("before", f"load {largest}")) == 1


def test_runs_reach_observers_and_second_generation_loads_nothing():
    pipe = Pipeline.load(default_model_path(), memory_budget=1.0)
    pipe.txt2img("a red circle", steps=2, seed=1, progress=False)
    recorder = Recorder()
    pipe.parts.observers.append(recorder)
    pipe.txt2img("a red circle", steps=2, seed=2, progress=False)
    assert ("after", "run unet") in recorder.events
    assert not any(event.startswith("load") for _, event in recorder.events)


@pytest.mark.parametrize("budget", [-1, float("nan"), float("inf"), True])
def test_bad_memory_budget_is_a_clear_error(budget):
    with pytest.raises(InputError, match="memory_budget"):
        Pipeline.load(default_model_path(), memory_budget=budget)

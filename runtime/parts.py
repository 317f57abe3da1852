"""The part pool: which graphs of a converted folder are loaded, when they are released, and hooks to watch.

A pipeline asks the pool for a part (``get("unet")``) when it needs it and tells it when it is done with it
(``done("unet")``). The memory policy is a budget in bytes over the parts' resident size: a part stays loaded
after use while the loaded parts fit the budget, and idle parts are released, smallest first, when a part
that is needed would not fit beside them. So a second generation in the same process costs only its compute
whenever the budget holds the pipeline, and a small budget (0: release every part after use) bounds the peak
to about the largest part instead of their sum.

Observers see every load, run and release (``PartObserver``): per-stage timing and memory are measured through
them, never by replacing the pool's methods.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from sdlite.engines import EditChain, Engine, GraphEdit, load_engine
from sdlite.errors import InputError
from sdlite.layout import SAFETY_CHECKER, check_part_graph, graph_files

# Resident bytes per byte of graph files: OpenVINO keeps the mapped weights file and its own repacked copy, so
# about two; onnxruntime holds its arena and initializers about once but pays for activations. Two is the
# conservative estimate for both.
RESIDENT_PER_FILE_BYTE = 2
# Parts whose arithmetic always runs in f32: the safety checker's thresholds decide whether an image is blacked
# out, and it is a small share of the work.
F32_PARTS = (SAFETY_CHECKER,)


class PartObserver(Protocol):
    """Receives the pool's events; each method is optional (missing ones are not called)."""

    def before(self, part: str, action: str) -> None:
        """``action`` ("load" or "run") of ``part`` is about to start."""

    def after(self, part: str, action: str, seconds: float) -> None:
        """``action`` of ``part`` took ``seconds``."""

    def released(self, part: str) -> None:
        """``part`` was released."""


def graph_bytes(path: Path) -> int:
    """Bytes of a graph's files: the graph itself and its weights beside it (``.bin``, ``.onnx_data``)."""
    return sum(file.stat().st_size for file in graph_files(path))


class _ObservedEngine:
    """A loaded engine whose ``run`` calls reach the pool's observers."""

    def __init__(self, pool: PartPool, part: str, engine: Engine):
        self._pool = pool
        self._part = part
        self.engine = engine
        self.input_names = engine.input_names
        self.output_names = engine.output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph (see :class:`sdlite.engines.Engine`), reporting the call to the observers."""
        with self._pool.observe(self._part, "run"):
            return self.engine.run(inputs)

    def release(self) -> None:
        """Free the graph (the pool does this; callers use ``PartPool.done``)."""
        self.engine.release()


class _Observation:
    def __init__(self, observers: list[PartObserver], part: str, action: str):
        self.observers, self.part, self.action = observers, part, action

    def __enter__(self) -> None:
        for observer in self.observers:
            if hasattr(observer, "before"):
                observer.before(self.part, self.action)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self.start
        for observer in self.observers:
            if hasattr(observer, "after"):
                observer.after(self.part, self.action, seconds)


class PartPool:
    """Loads the parts of one converted folder in one engine, keeps them within a memory budget, reports to
    observers.

    ``graph(name)`` resolves a part's graph file; ``budget_bytes`` None keeps every loaded part resident until
    :meth:`release`, 0 releases each part as soon as it is done. ``edits`` maps a part name to an edit of its
    loaded graph (textual inversion's token rows for the text encoder); :meth:`set_edit` adds or replaces one.
    ``f32_parts`` compute in f32 whatever ``compute`` is, as the text encoders and the safety checker always do."""

    def __init__(
        self,
        graph: Callable[[str], Path],
        engine: str,
        device: str = "CPU",
        threads: int | None = None,
        compute: str = "auto",
        budget_bytes: int | None = None,
        edits: Mapping[str, GraphEdit] | None = None,
        f32_parts: Collection[str] = (),
    ):
        self._graph = graph
        self.engine_name = engine
        self.device = device
        self.threads = threads
        self.compute = compute
        self.f32_parts = {*F32_PARTS, *f32_parts}
        self.budget_bytes = budget_bytes
        # Part -> its edits by name, applied in the order they were set.
        self._edits: dict[str, dict[str, GraphEdit]] = {part: {"base": edit} for part, edit in (edits or {}).items()}
        self._paths: dict[str, Path] = {}
        self._sizes: dict[str, int] = {}
        self._loaded: OrderedDict[str, _ObservedEngine] = OrderedDict()  # least recently used first
        self._in_use: set[str] = set()
        self.observers: list[PartObserver] = []

    def path(self, part: str) -> Path:
        """The graph file of ``part`` (resolved once; raises the folder's error for a missing part)."""
        if part not in self._paths:
            self._paths[part] = self._graph(part)
        return self._paths[part]

    def resident_bytes(self, part: str) -> int:
        """Estimated memory ``part`` holds while loaded (see ``RESIDENT_PER_FILE_BYTE``)."""
        if part not in self._sizes:
            self._sizes[part] = RESIDENT_PER_FILE_BYTE * graph_bytes(self.path(part))
        return self._sizes[part]

    def loaded(self) -> list[str]:
        """Names of the parts loaded now, least recently used first."""
        return list(self._loaded)

    def observe(self, part: str, action: str) -> _Observation:
        """A context manager that reports ``action`` of ``part`` (with its duration) to the observers."""
        return _Observation(self.observers, part, action)

    def get(self, part: str) -> _ObservedEngine:
        """The loaded engine of ``part``, loading it (and releasing others the budget cannot keep) if needed."""
        if part in self._loaded:
            self._loaded.move_to_end(part)
        else:
            self._make_room(part)
            compute = "f32" if part in self.f32_parts else self.compute
            edits = list(self._edits.get(part, {}).values())
            edit = None if not edits else edits[0] if len(edits) == 1 else EditChain(edits)
            with self.observe(part, "load"):
                engine = load_engine(self.path(part), self.engine_name, self.device, self.threads, compute, edit)
            try:
                check_part_graph(part, self.path(part), engine.input_names, engine.output_names)
            except InputError:
                engine.release()
                raise
            self._loaded[part] = _ObservedEngine(self, part, engine)
        self._in_use.add(part)
        return self._loaded[part]

    def set_edit(self, part: str, name: str, edit: GraphEdit | None) -> None:
        """Apply ``edit`` (None: no edit) as ``part``'s edit called ``name`` from its next load; a loaded part is
        released now, so that its next use loads the edited graph."""
        edits = self._edits.setdefault(part, {})
        if edits.get(name) is edit:
            return
        if edit is None:
            edits.pop(name, None)
        else:
            edits[name] = edit
        if part in self._loaded:
            self._release(part)

    def done(self, part: str) -> None:
        """The caller is done with ``part`` for now: it stays loaded while the budget allows."""
        self._in_use.discard(part)
        if self.budget_bytes is not None and part in self._loaded and self._total() > self.budget_bytes:
            self._release(part)

    def release(self) -> None:
        """Release every loaded part."""
        for part in list(self._loaded):
            self._release(part)
        self._in_use.clear()

    def _total(self) -> int:
        return sum(self.resident_bytes(part) for part in self._loaded)

    def _make_room(self, part: str) -> None:
        if self.budget_bytes is None:
            return
        need = self.resident_bytes(part)
        # Smallest first (least recently used among equals): a part's reload costs about its size, and a pipeline
        # uses its parts in a cycle, where releasing the least recently used would release the one needed next
        # (with room for the U-Net and one other part, LRU reloads the U-Net every generation).
        idle = sorted((p for p in self._loaded if p not in self._in_use), key=self.resident_bytes)
        for other in idle:
            if self._total() + need <= self.budget_bytes:
                break
            self._release(other)

    def _release(self, part: str) -> None:
        self._loaded.pop(part).release()
        for observer in self.observers:
            if hasattr(observer, "released"):
                observer.released(part)

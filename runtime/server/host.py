"""The model the server has loaded, and switching it. Only the worker thread calls these methods."""

from __future__ import annotations

from typing import Any

from sdlite.pipeline import Pipeline
from sdlite.server.catalog import Catalog, ModelEntry


class ModelHost:
    """Holds the pipeline of the current model; loads it on first use, after a switch or after an unload."""

    def __init__(self, catalog: Catalog, load_options: dict[str, Any]):
        self.catalog = catalog
        self.load_options = load_options
        self.entry: ModelEntry = catalog.entries[0]
        self._pipeline: Pipeline | None = None

    @property
    def loaded(self) -> bool:
        """Whether the current model's pipeline is in memory."""
        return self._pipeline is not None

    def pipeline(self) -> Pipeline:
        """The current model's pipeline, loaded if it is not."""
        if self._pipeline is None:
            self._pipeline = Pipeline.load(self.entry.path, **self.load_options)
        return self._pipeline

    def switch(self, entry: ModelEntry) -> None:
        """Make ``entry`` the current model and load it (the previous one is freed first)."""
        if entry != self.entry or self._pipeline is None:
            self.unload()
            previous, self.entry = self.entry, entry
            try:
                self.pipeline()
            except BaseException:
                self.entry = previous
                raise

    def unload(self) -> None:
        """Free the current model's pipeline (it loads again on the next generation)."""
        if self._pipeline is not None:
            self._pipeline.release()
            self._pipeline = None

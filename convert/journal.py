"""What a conversion has finished so far, so that an interrupted one can be resumed.

A conversion builds its folder in a work folder beside the output (``.NAME.sdlite-partial``) and renames it
only when everything is written and validated. The journal (``journal.json`` in the work folder) records each
finished step with the sha256 of every file it wrote; ``--resume`` keeps a step whose files are all still there
with those hashes and redoes the rest. The journal also records the options the conversion was started with:
resuming with other options is refused, since the kept files would not be what was asked for, except fewer
precisions: a conversion that cannot finish one (a W8A8 run killed for memory) is finished without it, and that
precision's finished variants are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sdlite.errors import InputError
from sdlite.hashing import sha256_file

JOURNAL = "journal.json"


def work_dir(out: Path) -> Path:
    """The work folder of a conversion into ``out``."""
    return out.parent / f".{out.name}.sdlite-partial"


class Journal:
    """The finished steps of one conversion, kept in its work folder."""

    def __init__(self, root: Path, options: dict, resume: bool):
        self.root = root
        self.options = options
        path = root / JOURNAL
        if root.exists() and not (resume and path.is_file()):
            # A fresh start (or a work folder without a journal: nothing in it can be trusted).
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        self.steps: dict[str, dict] = {}
        # sha256 by (inode, size, mtime): the fp32 variants are the base exports themselves (the same files, or
        # hard links to them), and the U-Net's are 3.4 GB: each is hashed once.
        self._digests: dict[tuple[int, int, int], str] = {}
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = {}
            old = state.get("options") or {}
            before, now = set(old.get("precisions") or []), set(options.get("precisions") or [])
            dropped = before - now
            if {**old, "precisions": options.get("precisions")} == options and now and now <= before:
                state["steps"] = self._without(state.get("steps", {}), dropped)
            elif old != options:
                raise InputError(
                    f"--resume: {root} holds a conversion started with other options or another source "
                    f"({_difference(state.get('options') or {}, options)}); run without --resume to start again"
                )
            self.steps = state.get("steps", {})
        self._write()

    def _without(self, steps: dict[str, dict], precisions: set[str]) -> dict[str, dict]:
        """``steps`` less the variants of ``precisions`` (``part/format/precision``), whose files are deleted."""
        kept = {}
        for step, record in steps.items():
            if step.count("/") == 2 and step.rsplit("/", 1)[1] in precisions:
                for name in record["files"]:
                    (self.root / name).unlink(missing_ok=True)
            else:
                kept[step] = record
        return kept

    def finished(self, step: str) -> dict | None:
        """The record of ``step`` if it finished and every file it wrote is intact, else None."""
        record = self.steps.get(step)
        if record is None:
            return None
        for name, digest in record["files"].items():
            path = self.root / name
            if not path.is_file() or self._sha256(path) != digest:
                del self.steps[step]
                return None
        return record

    def record(self, step: str, files: list[Path], **details) -> dict:
        """Mark ``step`` finished, having written ``files`` (inside the work folder); ``details`` are kept with it."""
        record = {"files": {str(f.relative_to(self.root)): self._sha256(f) for f in files}, **details}
        self.steps[step] = record
        self._write()
        return record

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256_file(path)
        return self._digests[key]

    def forget(self) -> None:
        """Drop the journal file (the work folder is about to become the output)."""
        (self.root / JOURNAL).unlink(missing_ok=True)

    def _write(self) -> None:
        path = self.root / JOURNAL
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"options": self.options, "steps": self.steps}, indent=1))
        os.replace(tmp, path)


def _difference(old: dict, new: dict) -> str:
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return "differs in " + ", ".join(changed) if changed else "unreadable"

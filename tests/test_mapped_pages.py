"""Giving back a mapped weights file's pages: the data stays readable, the resident set shrinks."""

import hashlib
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from sdlite.engines.mapped_pages import ReleasedWhileRunning, release

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux")


def resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                inside = len(fields) == 6 and fields[5] == str(path.resolve())
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def _mapped_weights(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).bytes(16 << 20)
    path.write_bytes(data)
    return path, hashlib.sha256(data).digest()


def test_release_drops_resident_pages_and_keeps_data(tmp_path):
    path, digest = _mapped_weights(tmp_path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert hashlib.sha256(mapped).digest() == digest  # touches every page
        assert resident_bytes(path) > 15 << 20
        assert release([tmp_path]) == 16 << 20
        assert resident_bytes(path) < 1 << 20
        assert hashlib.sha256(mapped).digest() == digest  # read back from the file


def test_release_leaves_other_folders_and_writable_mappings(tmp_path):
    path, _ = _mapped_weights(tmp_path)
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 0) as writable:
        writable[:4] = b"sdli"  # a dirty page must never be dropped
        bytes(writable)
        assert release([tmp_path]) == 0
        assert release([tmp_path / "elsewhere"]) == 0
        assert resident_bytes(path) > 15 << 20
        assert writable[:4] == b"sdli"


def test_released_while_running_gives_pages_back_during_the_block(tmp_path):
    path, digest = _mapped_weights(tmp_path)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with ReleasedWhileRunning([tmp_path], interval_s=0.01):
            assert hashlib.sha256(mapped).digest() == digest
        assert resident_bytes(path) < 1 << 20

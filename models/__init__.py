"""Recipes for the models sdlite's tests and demos use, and the embedded default model.

Importing this package is torch-free: the runtime uses it only to find the packaged default model.
The recipes themselves (``python -m sdlite.models``) need the ``convert`` extra.
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
CLIP_BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"


def default_model_path() -> Path:
    """Return the folder of the converted model that ships inside the package."""
    return DEFAULT_MODEL_DIR

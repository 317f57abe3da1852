"""Shared fixtures: the tiny model as a diffusers folder and converted by sdlite (built once per session);
and the ``torch`` marker.

Tests that need torch (the ``convert`` extra: torch, diffusers, transformers, ``sdlite.convert``, the recipes)
carry ``@pytest.mark.torch``. ``python -m pytest -m "not torch"`` runs the rest, which need only the runtime's
own dependencies (``pip install -e ".[test]"``). A test is torch-marked when it uses one of the fixtures below
that build models with torch (directly or through another fixture), when its module is torch-marked as a
whole, or when its module imports a package of the convert extra at its top level (see ``torch_module``).
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
from functools import cache
from pathlib import Path

import pytest

# The fixtures below that build their models with torch.
TORCH_FIXTURES = frozenset({"tiny_diffusers", "tiny_onnx", "all_precisions", "text_model_dir", "ddim_reference"})
# Import names of the convert extra and of the references that depend on torch (invisible-watermark and tomesd
# require it): a module importing one at its top level cannot even be collected without torch.
TORCH_PACKAGES = frozenset(
    {
        "torch",
        "diffusers",
        "transformers",
        "safetensors",
        "accelerate",
        "peft",
        "onnx",
        "onnxscript",
        "nncf",
        "optimum",
        "tomesd",
        "imwatermark",
        "sdlite.convert",
        "sdlite.models.recipes",
    }
)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _needs_torch(module_name: str) -> bool:
    """Whether importing ``module_name`` needs the convert extra."""
    return any(module_name == name or module_name.startswith(name + ".") for name in TORCH_PACKAGES)


def _names_torch_marker(node: ast.AST) -> bool:
    """Whether an expression mentions ``pytest.mark.torch`` (alone or in a list of marks)."""
    return any(
        isinstance(sub, ast.Attribute)
        and sub.attr == "torch"
        and isinstance(sub.value, ast.Attribute)
        and sub.value.attr == "mark"
        for sub in ast.walk(node)
    )


@cache
def torch_module(path: Path) -> bool:
    """Whether the test module at ``path`` needs torch as a whole.

    True when its ``pytestmark`` names the torch marker, or when a top-level statement imports a package of
    the convert extra (``import torch``, ``from diffusers import ...``, ``pytest.importorskip("torch")``).
    Read from the source, without importing it, so that an install without torch can leave it out."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(_needs_torch(alias.name) for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _needs_torch(node.module):
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.Expr) and node.value is not None:
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets) and _names_torch_marker(
                node.value
            ):
                return True
            for call in ast.walk(node.value):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "importorskip"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                    and isinstance(call.args[0].value, str)
                    and _needs_torch(call.args[0].value)
                ):
                    return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch, leave out the modules that need it as a whole: every test in them is torch-marked (so
    ``-m "not torch"`` would deselect them all), and importing them would fail or skip."""
    if HAVE_TORCH or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return True if torch_module(collection_path) else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Torch-mark the tests that use a torch-built fixture or live in a module that needs torch as a whole;
    first, so that ``-m`` deselects by the marks added here."""
    for item in items:
        in_torch_module = item.path.suffix == ".py" and torch_module(item.path)
        if in_torch_module or TORCH_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.torch)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    """The ``tiny`` recipe saved as a diffusers folder."""
    from sdlite.models.recipes import build

    return build("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_diffusers, tmp_path_factory) -> Path:
    """The tiny model converted to ONNX fp32 by ``sdlite.convert``."""
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-onnx"
    convert(str(tiny_diffusers), out, quiet=True)
    return out


@pytest.fixture(scope="session")
def all_precisions(tiny_diffusers, tmp_path_factory) -> Path:
    """The tiny model converted to ONNX and OpenVINO in every precision (fp32, fp16, int8, W8A8)."""
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("variants") / "all"
    convert(
        str(tiny_diffusers), out, formats=["onnx", "openvino"], precisions=["fp32", "fp16", "int8", "w8a8"], quiet=True
    )
    return out


@pytest.fixture(scope="session")
def text_model_dir(tiny_diffusers, tmp_path_factory):
    """The tiny model with a trained-looking final LayerNorm, converted by sdlite.

    Freshly initialised, the final LayerNorm has weight 1 and bias 0, so every token's output has mean 0
    and the emphasis rescale (original mean / weighted mean) divides noise by noise. Random weight and an
    offset bias give the chunk a mean well away from 0 (as in real CLIP) and make the clip-skip norm's
    parameters matter."""
    import torch
    from transformers import CLIPTextModel

    from sdlite.convert.converter import convert

    source = tmp_path_factory.mktemp("emphasis") / "diffusers"
    shutil.copytree(tiny_diffusers, source)
    model = CLIPTextModel.from_pretrained(source / "text_encoder")
    norm = model.text_model.final_layer_norm
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
        norm.bias.copy_(0.3 + 0.2 * torch.randn(norm.bias.shape, generator=gen))
    model.save_pretrained(source / "text_encoder")
    out = source.parent / "onnx"
    convert(str(source), out, quiet=True)
    return source, out


@pytest.fixture(scope="session")
def ddim_reference(tiny_diffusers):
    """``reference(prompt, steps, seed)``: diffusers' StableDiffusionPipeline on the tiny weights with DDIM
    and a torch CPU generator, decoded images (1, 64, 64, 3) in 0..1; the yardstick sdlite's runs are held to."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def reference(prompt: str, steps: int, seed: int):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(
            prompt, num_inference_steps=steps, height=64, width=64, output_type="np", generator=generator
        ).images

    return reference

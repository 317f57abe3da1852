"""sdlite serve, in process: real clients' requests (tests/server_clients.py), A1111 semantics, bad input.

The embedded model makes a 64x64 image in well under a second, so every test generates for real; images are
compared with the Python API's for the same parameters (the server must not change what is generated)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from server_clients import (  # noqa: E402
    SILLYTAVERN_CONNECT,
    basic,
    open_webui_txt2img,
    sillytavern_txt2img,
    tgw_txt2img,
)

from sdlite.infotext import parse_infotext  # noqa: E402
from sdlite.models import default_model_path  # noqa: E402
from sdlite.pipeline import Pipeline  # noqa: E402
from sdlite.server.app import create_app  # noqa: E402
from sdlite.server.catalog import Catalog  # noqa: E402
from sdlite.server.generation import Limits  # noqa: E402
from sdlite.server.jobs import QueueFull, Worker  # noqa: E402

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """A copy of the embedded model under another name, for model switching."""
    folder = tmp_path_factory.mktemp("models") / "shapes-b"
    shutil.copytree(default_model_path(), folder)
    manifest = json.loads((folder / "sdlite.json").read_text())
    manifest["name"] = "shapes-b"
    (folder / "sdlite.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def client(second_model, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("outputs")
    app = create_app(Catalog([default_model_path(), second_model]), outdir=outdir, preview_every=1)
    app.state.outdir = outdir
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(default_model_path())


def decode(b64: str) -> Image.Image:
    assert not b64.startswith("data:"), "A1111 clients expect bare base64"
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def infotext(image: Image.Image) -> dict[str, str]:
    prompt, negative, fields = parse_infotext(image.info["parameters"])
    return {"prompt": prompt, "negative": negative, **fields}


def test_sillytavern_connects_switches_model_and_generates(second_model):
    app = create_app(Catalog([default_model_path(), second_model]), token="user:" + TOKEN)
    headers = basic("user:" + TOKEN)
    with TestClient(app, raise_server_exceptions=False) as st:
        for path in SILLYTAVERN_CONNECT:
            assert st.get(path, headers=headers).status_code == 200, path
        titles = [m["title"] for m in st.get("/sdapi/v1/sd-models", headers=headers).json()]
        assert len(titles) == 2
        assert {"name", "label"} <= set(st.get("/sdapi/v1/schedulers", headers=headers).json()[0])
        assert st.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[1]}, headers=headers).status_code == 200
        # SillyTavern polls progress after a switch until progress == 0 and job_count === 0.
        state = st.get("/sdapi/v1/progress", headers=headers).json()
        assert state["progress"] == 0 and state["state"]["job_count"] == 0
        assert st.get("/sdapi/v1/options", headers=headers).json()["sd_model_checkpoint"] == titles[1]
        body = sillytavern_txt2img("a red circle", 1234, "user:" + TOKEN)
        result = st.post("/sdapi/v1/txt2img", json=body, headers=headers)
        assert result.status_code == 200, result.text
        fields = infotext(decode(result.json()["images"][0]))
        assert (fields["prompt"], fields["Seed"], fields["Model"]) == ("a red circle", "1234", "shapes-b")
        assert fields["Sampler"] == "DDIM" and fields["Size"] == "64x64"
        # Without credentials, or with SillyTavern's empty ones, nothing is answered.
        assert st.get("/sdapi/v1/options").status_code == 401
        assert st.post("/sdapi/v1/txt2img", json=body, headers={"Authorization": "Basic "}).status_code == 401
        assert st.get("/sdapi/v1/options", headers={"Authorization": "Bearer " + "user:" + TOKEN}).status_code == 200


def test_open_webui_posts_options_back_and_reads_images_and_info(client):
    options = client.get("/sdapi/v1/options").json()
    models = client.get("/sdapi/v1/sd-models").json()
    assert all({"title", "model_name"} <= set(m) for m in models)
    other = next(m["title"] for m in models if m["title"] != options["sd_model_checkpoint"])
    assert client.post("/sdapi/v1/options", json={**options, "sd_model_checkpoint": other}).status_code == 200
    after = client.get("/sdapi/v1/options").json()
    assert after["sd_model_checkpoint"] == other and after["samples_format"] == options["samples_format"]
    result = client.post("/sdapi/v1/txt2img", json=open_webui_txt2img("a blue square"))
    assert result.status_code == 200, result.text
    payload = result.json()
    info = json.loads(payload["info"])
    assert len(payload["images"]) == 2 == len(info["all_seeds"])
    for b64, seed, text in zip(payload["images"], info["all_seeds"], info["infotexts"], strict=True):
        fields = infotext(decode(b64))
        assert fields["Seed"] == str(seed) and fields["prompt"] == "a blue square"
        assert fields["Sampler"] == "Euler a" and fields["Schedule type"] == "Karras"
        assert decode(b64).info["parameters"] == text
    assert info["all_seeds"][1] == info["all_seeds"][0] + 1
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": options["sd_model_checkpoint"]})


def test_text_generation_webui_body_and_unload_reload(client):
    result = client.post("/sdapi/v1/txt2img", json=tgw_txt2img("a green triangle"))
    assert result.status_code == 200, result.text
    fields = infotext(decode(result.json()["images"][0]))
    assert fields["Steps"] == "8" and fields["Sampler"] == "DPM++ 2M"
    assert client.post("/sdapi/v1/unload-checkpoint", json="").status_code == 200
    assert client.post("/sdapi/v1/reload-checkpoint", json="").status_code == 200
    # After an unload, a generation loads the model again by itself.
    client.post("/sdapi/v1/unload-checkpoint")
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).status_code == 200


def test_server_image_equals_the_python_api_image(client, pipe):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 6, "cfg_scale": 5, "seed": 77,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2, "n_iter": 2,
            "override_settings": {"CLIP_stop_at_last_layers": 2}}  # fmt: skip
    payload = client.post("/sdapi/v1/txt2img", json=body).json()
    served = [np.asarray(decode(b64)) for b64 in payload["images"]]
    assert json.loads(payload["info"])["all_seeds"] == [77, 78, 79, 80]
    expected = []
    for seed in (77, 79):  # n_iter passes of batch_size images: seeds run on across passes
        expected += pipe.txt2img("a red circle", "blue", 6, 5, "DPM++ 2M", seed, batch=2, schedule="karras",
                                 clip_skip=2, progress=False)  # fmt: skip
    for got, want in zip(served, expected, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_img2img_and_inpainting(client, pipe):
    source = pipe.txt2img("a red circle", seed=3, steps=4, progress=False)[0]
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "a blue square", "init_images": [image], "denoising_strength": 0.5, "steps": 10, "seed": 9}
    payload = client.post("/sdapi/v1/img2img", json=body).json()
    got = decode(payload["images"][0])
    want = pipe.img2img("a blue square", source, 0.5, steps=10, seed=9, cfg_scale=7, progress=False)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert infotext(got)["Denoising strength"] == "0.5"

    mask = Image.new("L", source.size)
    mask.paste(255, (16, 16, 48, 48))
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")
    mask_b64 = "data:image/png;base64," + base64.b64encode(mask_buffer.getvalue()).decode()
    for fill in (0, 1, 2, 3):
        inpaint = {**body, "mask": mask_b64, "mask_blur": 2, "inpainting_fill": fill, "inpaint_full_res": True,
                   "inpaint_full_res_padding": 8, "denoising_strength": 0.9}  # fmt: skip
        result = client.post("/sdapi/v1/img2img", json=inpaint)
        assert result.status_code == 200, result.text
        out = np.asarray(decode(result.json()["images"][0])).astype(int)
        # Outside the blurred mask the original pixels are kept exactly.
        np.testing.assert_array_equal(out[:8, :8], np.asarray(source).astype(int)[:8, :8])
        assert infotext(decode(result.json()["images"][0]))["Inpaint area"] == "Only masked"
    inverted = client.post("/sdapi/v1/img2img", json={**body, "mask": mask_b64, "inpainting_mask_invert": 1}).json()
    centre = np.asarray(decode(inverted["images"][0]))[28:36, 28:36]
    np.testing.assert_array_equal(centre, np.asarray(source)[28:36, 28:36])


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic)", "Lanczos", "Nearest"])
def test_hires_fix_is_a_second_pass_at_the_larger_size(client, upscaler):
    body = {"prompt": "a red circle", "steps": 6, "seed": 21, "batch_size": 2, "enable_hr": True, "hr_scale": 1.5,
            "hr_upscaler": upscaler, "hr_second_pass_steps": 4, "denoising_strength": 0.55}  # fmt: skip
    payload = client.post("/sdapi/v1/txt2img", json=body).json()
    for i, b64 in enumerate(payload["images"]):
        image = decode(b64)
        assert image.size == (96, 96)
        fields = infotext(image)
        assert fields["Size"] == "64x64" and fields["Hires upscale"] == "1.5" and fields["Hires upscaler"] == upscaler
        assert fields["Hires steps"] == "4" and fields["Denoising strength"] == "0.55"
        assert fields["Seed"] == str(21 + i)


def test_variation_seed_moves_the_image_towards_the_subseed(client, pipe):
    base = {"prompt": "a red circle", "steps": 6, "seed": 5}
    plain = np.asarray(decode(client.post("/sdapi/v1/txt2img", json=base).json()["images"][0]), float)
    zero = client.post("/sdapi/v1/txt2img", json={**base, "subseed": 99, "subseed_strength": 0}).json()
    np.testing.assert_array_equal(np.asarray(decode(zero["images"][0]), float), plain)
    full = np.asarray(decode(client.post("/sdapi/v1/txt2img", json={**base, "seed": 99}).json()["images"][0]), float)
    varied = client.post("/sdapi/v1/txt2img", json={**base, "subseed": 99, "subseed_strength": 1.0}).json()
    np.testing.assert_allclose(np.asarray(decode(varied["images"][0]), float), full, atol=2)
    half = client.post("/sdapi/v1/txt2img", json={**base, "subseed": 99, "subseed_strength": 0.5}).json()
    fields = infotext(decode(half["images"][0]))
    assert fields["Variation seed"] == "99" and fields["Variation seed strength"] == "0.5" and fields["Seed"] == "5"


def _run_in_background(client, body):
    outcome = {}

    def call():
        outcome["response"] = client.post("/sdapi/v1/txt2img", json=body)

    thread = threading.Thread(target=call)
    thread.start()
    return thread, outcome


def _wait_for_step(client, least: int = 1) -> dict:
    deadline = time.time() + 60
    while time.time() < deadline:
        state = client.get("/sdapi/v1/progress?skip_current_image=false").json()
        if state["state"]["sampling_step"] >= least and state["current_image"]:
            return state
        time.sleep(0.02)
    raise AssertionError("the job never reported progress")


def test_progress_previews_and_interrupt(client):
    steps = 400
    thread, outcome = _run_in_background(client, {"prompt": "a red circle", "steps": steps, "seed": 1})
    state = _wait_for_step(client, 3)
    assert 0 < state["progress"] < 1 and state["state"]["job_count"] == 1 and state["eta_relative"] >= 0
    assert decode(state["current_image"]).size == (64, 64)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    response = outcome["response"]
    assert response.status_code == 200
    fields = infotext(decode(response.json()["images"][0]))
    assert fields["Seed"] == "1"
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0


def test_skip_ends_one_pass_and_runs_the_next(client):
    thread, outcome = _run_in_background(client, {"prompt": "x", "steps": 300, "seed": 4, "n_iter": 2})
    _wait_for_step(client)
    client.post("/sdapi/v1/skip")
    thread.join(120)
    info = json.loads(outcome["response"].json()["info"])
    assert info["all_seeds"] == [4, 5]


def test_openai_images_endpoint(client):
    body = {"prompt": "a red circle", "n": 2, "size": "64x64", "response_format": "b64_json", "model": "dall-e-3"}
    result = client.post("/v1/images/generations", json=body)
    assert result.status_code == 200, result.text
    data = result.json()["data"]
    assert len(data) == 2 and infotext(decode(data[0]["b64_json"]))["prompt"] == "a red circle"
    url = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"}).json()["data"][0]
    assert url["url"].startswith("data:image/png;base64,")
    assert client.get("/v1/models").json()["data"][0]["id"]


def test_png_info_reads_parameters_back(client):
    payload = client.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) circle", "steps": 3, "seed": 8}).json()
    info = client.post("/sdapi/v1/png-info", json={"image": payload["images"][0]}).json()
    assert info["parameters"]["Prompt"] == "a (red:1.2) circle" and info["parameters"]["Seed"] == "8"
    assert info["info"].startswith("a (red:1.2) circle\n")


def test_send_and_save_images(client):
    outdir = client.app.state.outdir
    payload = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 31, "send_images": False,
                                                      "save_images": True}).json()  # fmt: skip
    assert payload["images"] == []
    saved = list(outdir.rglob("*-31.png"))
    assert len(saved) == 1 and infotext(Image.open(saved[0]))["Seed"] == "31"


BAD_REQUESTS = [
    ("post", "/sdapi/v1/txt2img", b"{not json", 422, "not valid JSON"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("post", "/sdapi/v1/txt2img", {"prompt": ["x"]}, 422, "prompt"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "width": 100000}, 422, "width"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "width": 100}, 422, "multiples of 8"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 1000}, 422, "batch_size"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -3}, 422, "cfg_scale"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM fast"}, 422, "unknown sampler"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "polyexponential"}, 422, "schedule"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 422, "hr_upscaler"),
    (
        "post",
        "/sdapi/v1/txt2img",
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
        422,
        "unknown model",
    ),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"randn_source": "TPU"}}, 422, "randn_source"),
    ("post", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc"}, 422, "unknown model"),
    ("post", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}, 422, "CLIP_stop_at_last_layers"),
    ("post", "/sdapi/v1/options", [1, 2], 422, "body"),
    ("post", "/sdapi/v1/img2img", {"prompt": "x"}, 422, "init_images"),
    ("post", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}, 422, "init_images[0]"),
    ("post", "/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, 422, "init_images"),
    ("post", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["@@@"]}, 422, "init_images[0]"),
    ("post", "/sdapi/v1/png-info", {"image": "AAAA"}, 422, "image"),
    ("post", "/v1/images/generations", {"prompt": "x", "size": "big"}, 422, "size"),
    ("post", "/v1/images/generations", {"prompt": "x", "response_format": "gif"}, 422, "response_format"),
    ("post", "/v1/images/generations", {"n": 1}, 422, "prompt"),
]


@pytest.mark.parametrize("method, path, body, status, words", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(client, method, path, body, status, words):
    send = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    result = getattr(client, method)(path, **send)
    assert result.status_code == status, result.text
    assert words in result.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200


def test_sizes_beyond_the_limits_get_413(second_model):
    app = create_app(Catalog([default_model_path()]), limits=Limits(max_image_pixels=32 * 32), max_body_bytes=50_000)
    big = Image.new("RGB", (64, 64))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    with TestClient(app, raise_server_exceptions=False) as small:
        image = base64.b64encode(buffer.getvalue()).decode()
        result = small.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image]})
        assert result.status_code == 413 and "64x64" in result.json()["detail"]
        result = small.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["A" * 60_000]})
        assert result.status_code == 413
        assert small.get("/sdapi/v1/options").status_code == 200


def test_catalog_lists_only_converted_folders(tmp_path, second_model):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "model_index.json").write_text("{broken")
    shutil.copytree(second_model, tmp_path / "b")
    catalog = Catalog([], tmp_path)
    assert [entry.name for entry in catalog.entries] == ["shapes-b"]
    assert catalog.find("shapes-b").path == (tmp_path / "b").resolve()
    assert catalog.find(catalog.entries[0].title) is catalog.entries[0]


def test_queue_is_bounded():
    worker = Worker(max_queue=2, preview_every=0)  # not started: jobs stay queued
    worker.submit("a", lambda progress: None)
    worker.submit("b", lambda progress: None)
    with pytest.raises(QueueFull):
        worker.submit("c", lambda progress: None)


def test_interrupted_hires_fix_still_returns_finished_images(client):
    thread, outcome = _run_in_background(
        client, {"prompt": "x", "steps": 400, "seed": 3, "enable_hr": True, "hr_upscaler": "Latent"}
    )
    _wait_for_step(client, 3)
    client.post("/sdapi/v1/interrupt")
    thread.join(120)
    image = decode(outcome["response"].json()["images"][0])
    assert image.size == (128, 128) and infotext(image)["Hires upscaler"] == "Latent"

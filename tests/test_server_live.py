"""sdlite serve as a user runs it: a real server process on loopback, driven by many concurrent clients and by
the page in headless Chromium (Debian's chromium and chromium-driver, which .ci/run installs)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from sdlite.infotext import parse_infotext  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def call(base: str, path: str, body=None, timeout: float = 300) -> tuple[int, dict]:
    """One HTTP request; (status, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``sdlite serve`` on the embedded model, on a free loopback port; yields (base URL, pid)."""
    port = _free_port()
    cwd = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(
        [sys.executable, "-m", "sdlite", "serve", "--port", str(port), "--quiet", "--preview-every", "1"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if call(base, "/internal/ping", timeout=2)[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode())
    yield base, process.pid
    process.terminate()
    process.wait(30)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_fifty_concurrent_mixed_requests(server):
    base, pid = server
    assert call(base, "/sdapi/v1/txt2img", {"prompt": "warm up", "steps": 6, "seed": 1})[0] == 200
    baseline = _rss_kib(pid)
    source = _png(call(base, "/sdapi/v1/txt2img", {"prompt": "source", "steps": 4, "seed": 2})[1]["images"][0])
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()

    requests = []
    for k in range(50):
        kind = ("txt2img", "txt2img", "img2img", "progress", "txt2img", "interrupt", "txt2img", "img2img", "progress",
                "gone")[k % 10]  # fmt: skip
        requests.append((k, kind))

    def one(item):
        k, kind = item
        started = time.time()
        if kind == "txt2img":
            body = {"prompt": f"load test {k}", "steps": 6, "seed": 1000 + k, "batch_size": 1 + k % 2}
            status, payload = call(base, "/sdapi/v1/txt2img", body)
        elif kind == "img2img":
            body = {"prompt": f"load test {k}", "steps": 6, "seed": 1000 + k, "init_images": [init],
                    "denoising_strength": 0.6}  # fmt: skip
            status, payload = call(base, "/sdapi/v1/img2img", body)
        elif kind == "progress":
            status, payload = call(base, "/sdapi/v1/progress?skip_current_image=false")
        elif kind == "interrupt":
            time.sleep(0.5)
            status, payload = call(base, "/sdapi/v1/interrupt", {})
        else:  # a client that gives up while its job waits in the queue
            try:
                status, payload = call(base, "/sdapi/v1/txt2img", {"prompt": "gone", "steps": 6}, timeout=0.3)
            except (TimeoutError, OSError):
                status, payload = 0, None
        return k, kind, status, payload, time.time() - started

    started = time.time()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, requests))
    elapsed = time.time() - started

    images = 0
    for k, kind, status, payload, _ in results:
        if kind in ("txt2img", "img2img"):
            assert status == 200, (k, kind, status, payload)
            seeds = json.loads(payload["info"])["all_seeds"]
            assert seeds[0] == 1000 + k
            for i, b64 in enumerate(payload["images"]):
                prompt, _, fields = parse_infotext(_png(b64).info["parameters"])
                assert (prompt, fields["Seed"]) == (f"load test {k}", str(1000 + k + i)), (k, kind)
                images += 1
        elif kind == "gone":
            assert status in (0, 200, 503)
        else:
            assert status == 200, (k, kind, status, payload)
    assert elapsed < 600
    # The queue is not wedged: a request after the storm is answered at once.
    assert call(base, "/sdapi/v1/txt2img", {"prompt": "after", "steps": 2}, timeout=60)[0] == 200
    time.sleep(1)
    after = _rss_kib(pid)
    slowest = max(r[4] for r in results)
    print(
        f"\n50 concurrent requests: {elapsed:.1f} s in all, slowest {slowest:.1f} s, {images} images; "
        f"server RSS {baseline / 1024:.0f} MiB before, {after / 1024:.0f} MiB after"
    )
    assert after <= baseline * 1.10


def _browser():
    pytest.importorskip("selenium")
    from selenium import webdriver

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=options, service=service)


def test_page_generates_shows_progress_and_inpaints(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = server
    driver = _browser()
    try:
        driver.get(base + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "sampler").find_elements(By.TAG_NAME, "option"))
        assert "shapes" in driver.find_element(By.ID, "model").text
        driver.find_element(By.ID, "prompt").send_keys("a red circle")
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("400")
        seed = driver.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("42")
        driver.find_element(By.ID, "generate").click()
        seen = set()
        deadline = time.time() + 120
        while time.time() < deadline and not driver.find_elements(By.CSS_SELECTOR, "#gallery .result"):
            seen.add(float(driver.execute_script("return document.getElementById('progress-bar').value")))
            if driver.execute_script("return !document.getElementById('preview').hidden"):
                seen.add("preview")
            time.sleep(0.05)
        assert any(isinstance(v, float) and 0 < v < 1 for v in seen), f"the progress bar never moved: {seen}"
        assert "preview" in seen
        caption = driver.find_element(By.CSS_SELECTOR, "#gallery .result .infotext").text
        assert caption.startswith("a red circle") and "Seed: 42" in caption and "Steps: 400" in caption

        # Inpainting: upload an image, paint a mask on it, generate.
        picture = tmp_path / "input.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
        driver.find_element(By.ID, "mode-img2img").click()
        driver.find_element(By.ID, "image-input").send_keys(str(picture))
        wait.until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 64)
        canvas = driver.find_element(By.ID, "mask-canvas")
        ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(20, 10).release().perform()
        steps.clear()
        steps.send_keys("6")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result")) == 2)
        caption = driver.find_element(By.CSS_SELECTOR, "#gallery .result .infotext").text
        assert "Mask blur" in caption and "Denoising strength: 0.75" in caption, caption
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


def test_serve_refuses_bad_options():
    from sdlite.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--models", "/nonexistent-folder"]) == 2

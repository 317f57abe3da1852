"""The HTTP application: AUTOMATIC1111's API subset, OpenAI's images endpoint and the web page, on FastAPI.

Every request that makes images becomes a job for the one worker (``sdlite.server.jobs``); the handler waits for
it and, if its client disconnects first, drops or interrupts it. Errors are JSON ``{"error", "detail"}``: 401
without the token, 413 for a body or image beyond the limits, 422 for a wrong value (the detail names the field),
503 when the queue is full, 500 if a generation itself failed; the server goes on serving after any of them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from sdlite import __version__, schedulers
from sdlite.errors import InputError, SdliteError, summarize
from sdlite.images import INFOTEXT_KEY
from sdlite.infotext import parse_infotext
from sdlite.loras import LoraLibrary
from sdlite.server.catalog import Catalog
from sdlite.server.generation import (
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    RANDN_SOURCES,
    ImageTooLarge,
    Limits,
    decode_image,
    make_img2img_spec,
    make_spec,
    response,
    run,
)
from sdlite.server.host import ModelHost
from sdlite.server.jobs import QueueFull, Worker
from sdlite.server.schemas import Img2ImgBody, OpenAIImageBody, PngInfoBody, Txt2ImgBody

STATIC = resources.files("sdlite.server") / "static"
MAX_CLIP_SKIP = 12


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


def _error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuses request bodies over ``max_bytes`` with 413 before they are read whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, "PayloadTooLarge", f"request body over {self.max_bytes} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _authorized(header: str | None, token: str) -> bool:
    """Bearer TOKEN, or HTTP Basic whose ``user:password`` or password is TOKEN (A1111's ``--api-auth``)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            pair = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        password = pair.partition(":")[2]
        return secrets.compare_digest(pair.encode(), token.encode()) or secrets.compare_digest(
            password.encode(), token.encode()
        )
    return False


def create_app(
    catalog: Catalog,
    load_options: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    max_queue: int = 64,
    max_body_bytes: int = 64 << 20,
    preview_every: int = 5,
    outdir: Path | None = None,
) -> FastAPI:
    """The server's application for the models of ``catalog`` (the first one loaded at start), each loaded with
    ``load_options`` (``Pipeline.load``'s keywords). ``token`` guards every API route; ``limits`` bound what one
    request may ask; ``max_queue`` jobs may wait; previews are rendered every ``preview_every`` steps while a
    client polls for them; images asked to be saved go under ``outdir``."""
    limits = limits or Limits()
    host = ModelHost(catalog, load_options or {})
    worker = Worker(max_queue, preview_every)
    settings: dict[str, Any] = {
        "CLIP_stop_at_last_layers": 1,
        "randn_source": "CPU",
        "sd_vae": "Automatic",
        "samples_format": "png",
        "samples_save": outdir is not None,
        "live_previews_enable": preview_every > 0,
        "show_progress_every_n_steps": preview_every,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(host.pipeline)
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)
        host.unload()

    app = FastAPI(
        title="sdlite",
        version=__version__,
        description="Stable Diffusion on a CPU: AUTOMATIC1111's API, OpenAI's images API and a web page.",
        lifespan=lifespan,
        # FastAPI's own docs pages load their scripts from a CDN; sdlite's lists the OpenAPI document offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.host, app.state.worker, app.state.settings = host, worker, settings
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    async def require_token(request: Request) -> None:
        if token is not None and not _authorized(request.headers.get("authorization"), token):
            raise _Unauthorized

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: Exception):
        return _error(401, "Unauthorized", "missing or wrong token", {"WWW-Authenticate": 'Basic realm="sdlite"'})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [
            "request body is not valid JSON" if e["type"] == "json_invalid"
            else f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()
        ]  # fmt: skip
        return _error(422, "ValidationError", "; ".join(problems)[:2000])

    @app.exception_handler(ImageTooLarge)
    async def too_large(request: Request, exc: ImageTooLarge):
        return _error(413, "PayloadTooLarge", str(exc))

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError):
        return _error(422, "InputError", str(exc))

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull):
        return _error(503, "QueueFull", str(exc), {"Retry-After": "5"})

    @app.exception_handler(SdliteError)
    async def failed(request: Request, exc: SdliteError):
        return _error(500, "GenerationFailed", str(exc))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        return _error(500, type(exc).__name__, summarize(exc))

    async def wait(request: Request, kind: str, work) -> Any:
        job = worker.submit(kind, work)
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                worker.cancel(job)
                raise ClientGone

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return _error(499, "ClientClosedRequest", "the client went away")

    api = [Depends(require_token)]

    async def generate(request: Request, body: Txt2ImgBody, spec) -> dict:
        outcome = await wait(request, spec.mode, lambda progress: run(spec, host, progress, outdir))
        return response(spec, body, outcome)

    @app.post("/sdapi/v1/txt2img", dependencies=api, tags=["A1111"])
    async def txt2img(body: Txt2ImgBody, request: Request) -> dict:
        """Text to image (with hires. fix when ``enable_hr``)."""
        return await generate(request, body, make_spec(body, settings, catalog, host.entry, limits))

    @app.post("/sdapi/v1/img2img", dependencies=api, tags=["A1111"])
    async def img2img(body: Img2ImgBody, request: Request) -> dict:
        """Image to image; inpainting when ``mask`` is given."""
        return await generate(request, body, make_img2img_spec(body, settings, catalog, host.entry, limits))

    @app.get("/sdapi/v1/progress", dependencies=api, tags=["A1111"])
    async def progress(skip_current_image: bool = False) -> dict:
        """The running job's progress, ETA and (unless ``skip_current_image``) its latest preview."""
        if not skip_current_image:
            worker.progress.want_preview()
        return worker.progress.snapshot(not skip_current_image, worker.pending)

    @app.post("/sdapi/v1/interrupt", dependencies=api, tags=["A1111"])
    async def interrupt() -> dict:
        """Stop the running job at its next step; its images are made from where it got to."""
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip", dependencies=api, tags=["A1111"])
    async def skip() -> dict:
        """End the running batch at its next step and go on with the job's next one."""
        worker.skip()
        return {}

    @app.get("/sdapi/v1/options", dependencies=api, tags=["A1111"])
    async def get_options() -> dict:
        """The server's settings; ``sd_model_checkpoint`` is the current model's title."""
        return {**settings, "sd_model_checkpoint": host.entry.title, "sd_checkpoint_hash": host.entry.sha256}

    @app.post("/sdapi/v1/options", dependencies=api, tags=["A1111"])
    async def set_options(request: Request, body: dict[str, Any]) -> None:
        """Change settings; a new ``sd_model_checkpoint`` loads that model once the running job is done. Keys
        sdlite does not use are kept and read back (clients post the whole object back)."""
        changes = dict(body)
        entry = catalog.find(changes.pop("sd_model_checkpoint")) if "sd_model_checkpoint" in changes else None
        changes.pop("sd_checkpoint_hash", None)
        clip_skip = changes.get("CLIP_stop_at_last_layers", settings["CLIP_stop_at_last_layers"])
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= MAX_CLIP_SKIP:
            raise InputError(
                f"CLIP_stop_at_last_layers {clip_skip!r}: must be a whole number from 1 to {MAX_CLIP_SKIP}"
            )
        if changes.get("randn_source", "CPU") not in RANDN_SOURCES:
            raise InputError(f"randn_source {changes['randn_source']!r}: expected one of {', '.join(RANDN_SOURCES)}")
        if entry is not None and (entry != host.entry or not host.loaded):
            await wait(request, "switch", lambda progress: host.switch(entry))
        settings.update(changes)

    @app.get("/sdapi/v1/sd-models", dependencies=api, tags=["A1111"])
    async def sd_models() -> list[dict]:
        """The converted models this server can load."""
        return [entry.describe() for entry in catalog.entries]

    @app.post("/sdapi/v1/refresh-checkpoints", dependencies=api, tags=["A1111"])
    async def refresh_checkpoints() -> None:
        """Look for converted models in the models folder again."""
        await asyncio.to_thread(catalog.refresh)

    @app.post("/sdapi/v1/unload-checkpoint", dependencies=api, tags=["A1111"])
    async def unload_checkpoint(request: Request) -> dict:
        """Free the current model's memory once the running job is done (it loads again when next needed)."""
        await wait(request, "unload", lambda progress: host.unload())
        return {}

    @app.post("/sdapi/v1/reload-checkpoint", dependencies=api, tags=["A1111"])
    async def reload_checkpoint(request: Request) -> dict:
        """Load the current model again after an unload."""
        await wait(request, "reload", lambda progress: host.pipeline())
        return {}

    @app.get("/sdapi/v1/samplers", dependencies=api, tags=["A1111"])
    async def samplers() -> list[dict]:
        """The sampler names ``sampler_name`` takes."""
        return [{"name": name, "aliases": [], "options": {}} for name in schedulers.names()]

    @app.get("/sdapi/v1/schedulers", dependencies=api, tags=["A1111"])
    async def schedules() -> list[dict]:
        """The schedule types ``scheduler`` takes."""
        return [
            {"name": name, "label": schedulers.schedule_label(name), "aliases": None, "default_rho": -1,
             "need_inner_model": False}
            for name in schedulers.schedules()
        ]  # fmt: skip

    @app.get("/sdapi/v1/upscalers", dependencies=api, tags=["A1111"])
    async def upscalers() -> list[dict]:
        """The image upscalers hires. fix takes."""
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in IMAGE_UPSCALERS
        ]

    @app.get("/sdapi/v1/latent-upscale-modes", dependencies=api, tags=["A1111"])
    async def latent_upscale_modes() -> list[dict]:
        """The latent upscalers hires. fix takes."""
        return [{"name": name} for name in LATENT_UPSCALERS]

    @app.get("/sdapi/v1/loras", dependencies=api, tags=["A1111"])
    async def loras() -> list[dict]:
        """The LoRAs prompts can name (``<lora:name:multiplier>``): the files under ``--lora-dir``."""
        folder = host.load_options.get("lora_dir")
        if folder is None:
            return []
        library = LoraLibrary(folder)
        return [
            {"name": name, "alias": name, "path": str(path), "metadata": {}}
            for name in library.names
            for path in library.paths(name)[:1]
        ]

    @app.post("/sdapi/v1/refresh-loras", dependencies=api, tags=["A1111"])
    async def refresh_loras() -> None:
        """Nothing to refresh: the folder is read at each listing, and again when a prompt names a LoRA not seen."""

    @app.get("/sdapi/v1/sd-vae", dependencies=api, tags=["A1111"])
    async def sd_vae() -> list[dict]:
        """Separate VAE files: none (each converted model carries its own VAE)."""
        return []

    @app.get("/sdapi/v1/sd-modules", dependencies=api, tags=["A1111"], include_in_schema=False)
    async def sd_modules() -> list[dict]:
        return []

    @app.post("/sdapi/v1/png-info", dependencies=api, tags=["A1111"])
    async def png_info(body: PngInfoBody) -> dict:
        """The generation parameters stored in a PNG (its ``parameters`` text), raw and parsed."""
        image = decode_image("image", body.image, limits)
        text = image.info.get(INFOTEXT_KEY, "")
        items = {key: value for key, value in image.info.items() if isinstance(value, str) and key != INFOTEXT_KEY}
        parsed: dict[str, Any] = {}
        if text:
            prompt, negative, fields = parse_infotext(text)
            parsed = {"Prompt": prompt, "Negative prompt": negative, **fields}
        return {"info": text, "items": items, "parameters": parsed}

    @app.get("/internal/ping", tags=["A1111"])
    async def ping() -> dict:
        """Answers as soon as the server is up."""
        return {}

    @app.post("/v1/images/generations", dependencies=api, tags=["OpenAI"])
    async def openai_images(body: OpenAIImageBody, request: Request) -> dict:
        """OpenAI's image generation: ``n`` images of ``size`` for ``prompt``, as base64 PNG or data: URLs."""
        if body.response_format not in (None, "b64_json", "url"):
            raise InputError(f"response_format {body.response_format!r}: expected b64_json or url")
        width = height = None
        if body.size and body.size != "auto":
            try:
                width, height = (int(side) for side in body.size.lower().split("x"))
            except ValueError:
                raise InputError(f"size {body.size!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
        known = {entry.title for entry in catalog.entries} | {entry.name for entry in catalog.entries}
        a1111 = Txt2ImgBody(
            prompt=body.prompt, negative_prompt=body.negative_prompt, batch_size=body.n, width=width, height=height,
            steps=body.steps, cfg_scale=body.cfg_scale, seed=body.seed, sampler_name=body.sampler_name,
            override_settings={"sd_model_checkpoint": body.model} if body.model in known else None,
        )  # fmt: skip
        result = await generate(request, a1111, make_spec(a1111, settings, catalog, host.entry, limits))
        key = "url" if body.response_format == "url" else "b64_json"
        prefix = "data:image/png;base64," if key == "url" else ""
        return {"created": int(time.time()), "data": [{key: prefix + image} for image in result["images"]]}

    @app.get("/v1/models", dependencies=api, tags=["OpenAI"])
    async def openai_models() -> dict:
        """The models, in OpenAI's list shape."""
        return {
            "object": "list",
            "data": [{"id": entry.title, "object": "model", "owned_by": "sdlite"} for entry in catalog.entries],
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(str(STATIC / "docs.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


class _Unauthorized(Exception):
    pass


__all__ = ["create_app"]

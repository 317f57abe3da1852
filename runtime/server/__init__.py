"""``sdlite serve``: a local HTTP server for AUTOMATIC1111 clients (SillyTavern, Open WebUI, ...), OpenAI's
images API and a web page, on the models of converted folders. Needs the ``serve`` extra (FastAPI, uvicorn)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from sdlite.errors import InputError

__all__ = ["serve"]


def serve(
    models: list[Path],
    models_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    load_options: dict[str, Any] | None = None,
    quiet: bool = False,
    **app_options: Any,
) -> None:
    """Serve the given model folders (and those in ``models_dir``) until interrupted; ``app_options`` are
    :func:`sdlite.server.app.create_app`'s keywords (token, limits, max_queue, preview_every, outdir)."""
    try:
        import uvicorn

        from sdlite.server.app import create_app
    except ImportError as exc:
        raise InputError(
            f"sdlite serve needs the serve extra ({exc.name} is missing): pip install 'sdlite[serve]'"
        ) from None
    from sdlite.server.catalog import Catalog

    with socket.socket() as probe:  # a clear one-line error for a taken port, before any model is loaded
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    catalog = Catalog(models, models_dir)
    app = create_app(catalog, load_options, **app_options)
    # The first model loads here, not in the server's startup, so that a bad folder or option ends in one line and
    # exit code 2 rather than in uvicorn's traceback.
    app.state.host.pipeline()
    if not quiet:
        print(f"sdlite serve: {catalog.entries[0].title} on http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")

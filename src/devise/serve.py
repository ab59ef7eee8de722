"""The web page and JSON API (`devise serve`): predict labels for an uploaded image, search an index by text.

`create_app(model, index, vocab)` loads the model, the vocabulary and the index ONCE and returns a
FastAPI app (OpenAPI docs at /docs):
- GET  /               the page (static/index.html: plain HTML and a little JavaScript);
- POST /api/predict    multipart field `image`, query `k` -> {"image", "predictions": [{"label", "synset", "score"}]}
- GET  /api/search     ?q=TEXT&k=K -> {"query", "results": [{"image": PATH, "score"}]}
- GET  /api/image      ?path=PATH -> the image file, only for paths in the loaded index;
- GET  /api/info       what is loaded.
Bad input is always a 4xx with {"detail": "..."}: 413 for uploads over the size limit or images over the
pixel limit (decompression bombs), 415 for files that are not images, 400 for damaged images.
"""
from __future__ import annotations

import io
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
# Module level (not inside create_app): FastAPI resolves the endpoints' annotations in these globals.
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from devise.errors import DeviseError

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 MP: bigger than any camera photo, far below what a bomb expands to
MAX_K = 100


def decode_upload(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Uploaded bytes -> uint8 (size, size, 3), or fastapi.HTTPException (4xx) saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    from devise.images import CROP_FRACTION, to_rgb_array

    if not data:
        raise HTTPException(400, "empty upload: choose an image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise HTTPException(413, f"image is {image.width}x{image.height} pixels, over the limit of "
                                         f"{max_pixels:,} (refused as a possible decompression bomb)")
            image.draft("RGB", (round(size / CROP_FRACTION),) * 2)
            return to_rgb_array(image, size)
    except HTTPException:
        raise
    except UnidentifiedImageError:
        raise HTTPException(415, "not an image: the file format was not recognised (use JPEG, PNG, WebP, GIF...)")
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"refused as a decompression bomb: {exc}")
    except Exception as exc:  # anything else that fails on user bytes is a damaged image, never a 500
        raise HTTPException(400, f"damaged or truncated image: {exc.__class__.__name__}: {exc}")


def create_app(model="conse", index: str | os.PathLike | None = None, vocab="wordnet", *, top_k: int = 5,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, drop_missing: bool = False):
    """The FastAPI app with the model, vocabulary and optional search index loaded once."""
    from devise.predict import load_embedder, load_vocabulary, predict_arrays
    from devise.search import load_index, search

    embedder = load_embedder(model)
    vocabulary = load_vocabulary(vocab, embedder.vectors_spec, drop_missing=drop_missing)
    image_index = load_index(index) if index else None
    if image_index is not None and image_index.embeddings.shape[1] != embedder.dim:
        raise DeviseError(f"{index}: index is {image_index.embeddings.shape[1]}-d but the model is {embedder.dim}-d")
    allowed = set(image_index.paths) if image_index is not None else set()
    size = embedder.backbone.image_size
    embedder.embed_images(np.zeros((1, size, size, 3), np.uint8))  # compile now, not on the first request

    app = FastAPI(title="devise", version="0.1.0",
                  description="DeViSE open-vocabulary prediction and image search (Frome et al. 2013)")

    @app.middleware("http")
    async def limit_upload_size(request: Request, call_next):
        # Refuse a too-large body before it is read and spooled to disk (the handler re-checks the bytes).
        length = request.headers.get("content-length")
        if request.url.path == "/api/predict" and length and length.isdigit() \
                and int(length) > max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload is {int(length):,} bytes, over the limit of "
                                           f"{max_upload_bytes:,}"}, status_code=413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    def info() -> dict:
        """What the server has loaded."""
        return {"model": embedder.name, "vectors": embedder.vectors_spec, "vocab": vocabulary.name,
                "labels": len(vocabulary), "index": len(image_index) if image_index is not None else None,
                "max_upload_bytes": max_upload_bytes}

    @app.post("/api/predict")
    def predict(image: UploadFile = File(..., description="an image file"),
                k: int = Query(top_k, ge=1, le=MAX_K, description="how many labels")) -> dict:
        """Top-k labels of one uploaded image: the same object as `devise predict --json`."""
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is over the limit of {max_upload_bytes:,} bytes")
        array = decode_upload(data, size, max_pixels)
        return {"image": image.filename or "upload",
                "predictions": predict_arrays(array[None], embedder, vocabulary, k)[0]}

    @app.get("/api/search")
    def search_text(q: str = Query(..., min_length=1, max_length=200, description="words or a phrase"),
                    k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        """Images of the index nearest to a text query."""
        if image_index is None:
            raise HTTPException(404, "no image index loaded: start the server with --index INDEX")
        try:
            return search(image_index, text=q, top_k=k)
        except DeviseError as exc:
            raise HTTPException(400, str(exc))

    @app.get("/api/image")
    def image_file(path: str = Query(..., description="an image path from a search result")):
        """An image of the loaded index (only those: no other file is ever served)."""
        if path not in allowed or not Path(path).is_file():
            raise HTTPException(404, "not an image of the loaded index")
        return FileResponse(path)

    return app


@contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
    """Run `app` with uvicorn in a background thread; yields its base URL (port 0: a free port)."""
    import uvicorn

    # A long keep-alive: a busy client thread must not find its idle connection closed under it.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=60))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise DeviseError(f"server on {host}:{port} did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


def serve(model="conse", index=None, vocab="wordnet", host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 10.0, drop_missing: bool = False) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model, index, vocab, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                     drop_missing=drop_missing)
    print(f"devise: serving on http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

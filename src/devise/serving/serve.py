"""The web page and JSON API (`devise serve`): predict labels for an uploaded image, search an index by text.

`create_app(model, index, vocab)` loads the model, the vocabulary and the index ONCE and returns a
FastAPI app (OpenAPI docs at /docs):
- GET  /               the page (static/index.html: plain HTML and a little JavaScript);
- POST /api/predict    multipart field `image`, query `k`, `min_confidence` -> {"image", "answer" (a label or
                       "unknown"), "min_confidence", "predictions": [{"label", "synset", "score", "probability"}]}
- GET  /api/search     ?q=TEXT&k=K -> {"query", "results": [{"image": PATH, "score"}]}
- GET  /api/image      ?path=PATH -> the image file, only for paths in the loaded index and only while
                       the file is the one indexed (404 gone, 409 changed or replaced: IndexedFiles);
- GET  /api/info       what is loaded.
Bad input is always a 4xx with {"detail": "..."}: 413 for uploads over the size limit or images over the
pixel limit (decompression bombs), 415 for files that are not images, 400 for damaged images.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import io
import mimetypes
import os
import platform
import socket
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Module level (not inside create_app): FastAPI resolves the endpoints' annotations in these globals.
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from devise.errors import DeviseError
from devise.data.images import CROP_FRACTION, to_rgb_array
from devise.models.model import load
from devise.evaluation.confidence import background_pool, resolve_threshold, select_background
from devise.serving.predict import predict_arrays, with_answers
from devise.models.presets import DEFAULT_MODEL
from devise.serving.search import load_index, search
from devise.labels.vectors import SentenceEncoder, load_vectors
from devise.labels.vocabulary import load_vocabulary

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 MP: bigger than any camera photo, far below what a bomb expands to
MAX_K = 100
IMAGE_CHUNK = 256 * 1024  # /api/image streams files in pieces: a large photo never sits whole in memory


def decode_upload(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Uploaded bytes -> uint8 (size, size, 3), or fastapi.HTTPException (4xx) saying what is wrong."""
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


class IndexedFiles:
    """The image files of a loaded index, served only while each is still the file that was indexed.

    The index stores every path resolved, with the file's size, modification time, device and inode when it
    was embedded (`search._stamp`; older indexes lack the last two, which are then read when the
    server starts). A request is refused when the path is now a symbolic link, resolves elsewhere
    (a folder on the way was swapped), is another file (device/inode) or changed (size/mtime): the index
    describes that path's old contents, and a swapped link could point anywhere on the disk. The checks
    run on the opened file descriptor, and the bytes sent are read from that same descriptor.
    """

    def __init__(self, paths: list[str], stamps: list[list[int]]):
        self.stamps = {path: list(stamp) if stamp else None for path, stamp in zip(paths, stamps)}
        self.identity: dict[str, tuple[int, int]] = {}
        for path, stamp in self.stamps.items():
            if stamp and len(stamp) >= 4:
                self.identity[path] = (stamp[2], stamp[3])
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue  # gone already: refused when asked for
            if stat.S_ISREG(st.st_mode) and self._same_contents(st, stamp):
                self.identity[path] = (st.st_dev, st.st_ino)

    def __contains__(self, path: str) -> bool:
        return path in self.stamps

    @staticmethod
    def _same_contents(st: os.stat_result, stamp) -> bool:
        return bool(stamp) and [st.st_size, st.st_mtime_ns] == list(stamp[:2])

    def open(self, path: str):
        """(binary file, its stat) for an indexed path that is unchanged; else HTTPException: 404 for a
        path that is not in the index or no longer exists, 409 for one that changed since indexing."""
        if path not in self.stamps:
            raise HTTPException(404, "not an image of the loaded index")
        # O_NOFOLLOW: a symbolic link in the path's own place is refused by the kernel, not followed;
        # O_NONBLOCK: a FIFO swapped in cannot hang the request (no effect on regular files).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise HTTPException(404, f"{path}: no longer exists (removed since indexing)") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HTTPException(409, f"{path}: is now a symbolic link (it was a file when indexed)") from None
            raise HTTPException(404, f"{path}: cannot be read ({exc.strerror})") from None
        file = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            reason = None
            if not stat.S_ISREG(st.st_mode):
                reason = "is no longer a regular file"
            elif os.path.realpath(path) != path:
                reason = "now resolves to another file (a folder on its path was replaced by a link)"
            elif not self._same_contents(st, self.stamps[path]):
                reason = "changed since indexing (size or modification time differ); re-run devise index"
            elif self.identity.get(path) != (st.st_dev, st.st_ino):
                reason = "was replaced by another file since indexing (device/inode differ)"
            if reason:
                raise HTTPException(409, f"{path}: {reason}")
        except BaseException:
            file.close()
            raise
        return file, st


def _stream(file, size: int):
    """The first `size` bytes of an open file, in pieces; closes it (also when the client goes away)."""
    with file:
        left = size
        while left > 0:
            piece = file.read(min(IMAGE_CHUNK, left))
            if not piece:
                break
            left -= len(piece)
            yield piece


def create_app(model=DEFAULT_MODEL, index: str | os.PathLike | None = None, vocab="wordnet", *, top_k: int = 5,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, drop_missing: bool = False,
               vectors: str | None = None):
    """The FastAPI app with the model, vocabulary and optional search index loaded once.

    model: a preset name, a run folder or a DeviseModel; vectors: a preset's label space."""
    model = load(model, vectors)
    model.check_open_vocabulary()
    vocabulary = load_vocabulary(vocab, model.vectors_spec, drop_missing=drop_missing)
    image_index = load_index(index) if index else None
    if image_index is not None and image_index.embeddings.shape[1] != model.dim:
        raise DeviseError(f"{index}: index is {image_index.embeddings.shape[1]}-d but the model is {model.dim}-d")
    # The index's word vectors, loaded ONCE: search.search() loads them on every call (a 400K-word list
    # and a dict over it, ~140 ms and ~100 MB of short-lived objects a query; 'minilm' a whole encoder),
    # which under concurrent requests left each thread's malloc arena holding its own fragmented copy.
    vectors = load_vectors(image_index.vectors_spec) if image_index is not None else None
    if isinstance(vectors, SentenceEncoder):
        # Its cache keeps what it encodes, on disk and in memory: right for label sets, but a server would
        # keep every distinct query it is ever sent. A query is encoded afresh instead (milliseconds).
        vectors.cache = None
    indexed = IndexedFiles(image_index.paths, image_index.stamps) if image_index is not None else IndexedFiles([], [])
    size = model.backbone.image_size
    model.encode_images(np.zeros((1, size, size, 3), np.uint8))  # compile now, not on the first request
    # The vocabulary's confidence background (devise.evaluation.confidence), selected once, not per request.
    background = select_background(background_pool(model.vectors_spec), vocabulary.matrix,
                                   model.confidence.background) if model.confidence.background else None

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
        return {"model": model.name, "vectors": model.vectors_spec, "vocab": vocabulary.name,
                "labels": len(vocabulary), "index": len(image_index) if image_index is not None else None,
                "max_upload_bytes": max_upload_bytes, "min_confidence": resolve_threshold(model, None, len(vocabulary.matrix))}

    @app.post("/api/predict")
    def predict(image: UploadFile = File(..., description="an image file"),
                k: int = Query(top_k, ge=1, le=MAX_K, description="how many labels"),
                min_confidence: float | None = Query(None, ge=0, le=1, description="below this probability the "
                                                     "answer is 'unknown' (default: the model's threshold)")) -> dict:
        """Top-k labels of one uploaded image: the same object as `devise predict --json`."""
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is over the limit of {max_upload_bytes:,} bytes")
        array = decode_upload(data, size, max_pixels)
        ranked = predict_arrays(array[None], model, vocabulary, k, background=background)
        return with_answers([image.filename or "upload"], ranked, resolve_threshold(model, min_confidence, len(vocabulary.matrix)))[0]

    @app.get("/api/search")
    def search_text(q: str = Query(..., min_length=1, max_length=200, description="words or a phrase"),
                    k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        """Images of the index nearest to a text query."""
        if image_index is None:
            raise HTTPException(404, "no image index loaded: start the server with --index INDEX")
        try:
            return search(image_index, text=q, top_k=k, vectors=vectors)
        except DeviseError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/api/image")
    def image_file(path: str = Query(..., description="an image path from a search result")):
        """An image of the loaded index, as it was indexed (only those: no other file is ever served;
        404 if it is not in the index or is gone, 409 if it changed or was replaced since indexing)."""
        file, st = indexed.open(path)
        return StreamingResponse(_stream(file, st.st_size),
                                 media_type=mimetypes.guess_type(path)[0] or "application/octet-stream",
                                 headers={"content-length": str(st.st_size), "x-content-type-options": "nosniff"})

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


def limit_heap_growth() -> bool:
    """Keep glibc malloc from growing a long-running server's RSS through fragmentation; True if applied.

    Every request allocates buffers of a different size (the upload, its decoded pixels, resize buffers)
    in whichever of up to 8 x cores per-thread arenas its worker thread uses, and glibc raises its mmap
    threshold after each large free, so such buffers then come from those arenas and stay resident.
    benchmarks/serve_memory.py, 400 mixed requests: +8.8% RSS without this, +1.2% with it. A fixed
    128 KiB threshold returns every large buffer to the system on free; two arenas bound the rest.
    Settings the user made (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) are left alone; not glibc: nothing.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # malloc.h
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(m_arena_max, 2)
    return True


def bind_port(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to host:port and listening (port 0: a free one), or a one-line DeviseError when the
    port is taken. Claiming the port first means a busy port fails in a second, not after the model
    loaded and the server said it was serving."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise DeviseError(f"cannot serve on {host}:{port}: unknown host ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DeviseError(f"port {port} on {host} is already in use (another server?): stop it or choose "
                              "another with --port") from None
        raise DeviseError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(model=DEFAULT_MODEL, index=None, vocab="wordnet", host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 10.0, drop_missing: bool = False, vectors: str | None = None) -> None:
    """Run the app with uvicorn until interrupted. The port is claimed before the model loads (a busy one
    is a one-line DeviseError); the line printed names the port really bound (port 0: a free one)."""
    import uvicorn

    sock = bind_port(host, port)
    limit_heap_growth()  # before the model loads and the server's threads start
    try:
        app = create_app(model, index, vocab, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                         drop_missing=drop_missing, vectors=vectors)
        shown = f"[{host}]" if ":" in host else host
        print(f"devise: serving on http://{shown}:{sock.getsockname()[1]}/ (API docs at /docs)", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()

"""``leukoscope serve``: a FastAPI app with a JSON API and a drag-and-drop web page.

Uploads are read into memory with a byte limit, then decoded (with a pixel limit) and classified
in a thread pool, a bounded number at a time, so the event loop stays free; nothing is written to
disk by this code (Starlette spools large multipart parts to the system temp directory). Every
error, bad uploads and malformed requests alike, is a 4xx JSON ``{"error": ..., "file": ...}``, except that a bad file
among readable ones is an error entry in its place among the results, so one corrupt file does not cost a batch.
Each result carries a PNG preview of exactly the region the model saw, rendered by the server, so
the page shows every accepted format (TIFF too) and the heatmap lines up with its preview.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import LeukoscopeError
from ..explain import Explainer
from ..images import ImageReadError, load_view, png_bytes
from ..inference import Predictor

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 25_000_000
MAX_FILES = 32
MAX_CONCURRENT = 2  # requests decoding and classifying at once (one per core here); the rest wait their turn
# Any image/* type: clients name the same format many ways (image/jpg, image/pjpeg, image/x-png, image/x-tiff), and the
# file's bytes, not its type, decide what it is. Untyped uploads (curl's default for unknown extensions) are accepted too.
UNTYPED = ("application/octet-stream", "")


class UploadError(Exception):
    def __init__(self, status: int, filename: str, reason: str):
        super().__init__(reason)
        self.status, self.filename, self.reason = status, filename, reason


def only_query(*names: str):
    """A dependency that refuses query options the route does not know (a typo must not pass silently)."""

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(names))
        if unknown:
            known = ", ".join(names) or "none"
            raise UploadError(422, "", f"unknown query option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known: {known}")

    return Depends(check)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = e.get("msg", "invalid")
        if "Expected UploadFile" in msg:  # a part without a file name: a form sent with no file chosen, or text
            msg = "a form field with no file in it (no file chosen, or text instead of an image)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) + " (send images as multipart form field 'files')"


def create_app(predictor: Predictor, name: str = "model", max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               max_concurrent: int = MAX_CONCURRENT) -> FastAPI:
    app = FastAPI(title="Leukoscope", version=__version__, description="Blood-cell image classification: predictions, probabilities and Grad-CAM heatmaps.")
    explainer: list[Explainer | None] = []
    page = (resources.files("leukoscope.serve") / "static" / "index.html").read_text(encoding="utf-8")
    slots = asyncio.Semaphore(max_concurrent)

    def get_explainer() -> Explainer | None:
        if not explainer:
            try:
                explainer.append(Explainer(predictor))
            except LeukoscopeError:
                explainer.append(None)
        return explainer[0]

    @app.exception_handler(UploadError)
    async def upload_error(request, err: UploadError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content={"error": err.reason, "file": err.filename})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": _validation_message(err), "file": ""})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=err.status_code, content={"error": str(err.detail), "file": ""}, headers=err.headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health", dependencies=[only_query()])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "version": __version__}

    @app.get("/models", dependencies=[only_query()])
    async def models() -> dict[str, Any]:
        meta = predictor.meta
        entry = {"name": name, "kind": predictor.kind, "arch": meta.get("arch"), "classes": predictor.class_names,
                 "image_size": predictor.image_size, "temperature": predictor.temperature,
                 "test_metrics": meta.get("metrics", {}).get("test", {})}
        if meta.get("restricted_from"):
            entry["restricted_from"] = meta["restricted_from"]
        return {"models": [entry]}

    @app.post("/predict", dependencies=[only_query("heatmap")])
    async def predict(files: list[UploadFile] = File(..., description="one or several cell images"),
                      heatmap: bool = Query(False, description="add a Grad-CAM overlay PNG as a data URL")) -> dict[str, Any]:
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} files per request, got {len(files)}")
        uploads = refuse_if_none_read(await read_uploads(files, max_bytes))
        async with slots:
            started = time.perf_counter()
            decoded = refuse_if_none_read(await run_in_threadpool(decode_uploads, uploads, predictor, max_pixels))
            good = [image for _, image in decoded if not isinstance(image, UploadError)]
            classified = iter(await run_in_threadpool(classify, predictor, good, get_explainer() if heatmap else None))
        results = [failed(image) if isinstance(image, UploadError) else {**next(classified), "filename": filename}
                   for filename, image in decoded]
        return {"model": name, "results": results, "seconds": round(time.perf_counter() - started, 4)}

    @app.post("/count", dependencies=[only_query()])
    async def count(files: list[UploadFile] = File(..., description="one or several smear fields")) -> dict[str, Any]:
        """Every white cell of each field: boxes, labels and an overlay per field, and the differential over all of them."""
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} files per request, got {len(files)}")
        uploads = refuse_if_none_read(await read_uploads(files, max_bytes))
        async with slots:
            started = time.perf_counter()
            results, summary = await run_in_threadpool(count_fields, uploads, predictor, max_pixels)
        return {"model": name, "results": results, "summary": summary, "seconds": round(time.perf_counter() - started, 4)}

    return app


def count_fields(uploads: list[tuple[str, bytes | UploadError]], predictor: Predictor, max_pixels: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per field its cells and overlay, or its error; the summary row over every field (``error`` says how many were
    not counted). When no field could be counted, the first one's error is the request's 4xx."""
    from ..counting import summarise
    from ..predict import looks_unlike

    outcomes, everything = [], []
    for filename, data in uploads:
        outcome, cells = _count_upload(filename, data, predictor, max_pixels)
        outcomes.append((filename, outcome))
        everything.extend(cells)
    results = [failed(v) if isinstance(v, UploadError) else v for _, v in refuse_if_none_read(outcomes)]
    total = summarise(everything, [("upload", f) for f, _ in uploads], predictor.class_names)[-1]
    summary = {k: v for k, v in total.items() if k not in ("slide", "image")}
    unlike = looks_unlike(summary["n_out_of_domain"], summary["n_cells"])  # count's own rule, so the page restates nothing
    summary["warning"] = None if unlike is None else (f"{summary['n_out_of_domain']} of the {summary['n_cells']} cells {unlike} "
                                                      "the model's training images: treat the differential as unreliable.")
    return results, summary


def _count_upload(filename: str, data: bytes | UploadError, predictor: Predictor, max_pixels: int
                  ) -> tuple[dict[str, Any] | UploadError, list[Any]]:
    """One field's result (cells and overlay) or its UploadError, and its records for the summary."""
    from ..counting import CountedCell, as_dicts, count_source, overlay

    if isinstance(data, UploadError):
        return data, [CountedCell("upload", filename, error=data.reason)]
    rgb, cells, _, scale = count_source(predictor, data, "upload", filename, max_pixels)
    if rgb is None:  # unreadable, too large or grayscale (not a field "with 0 cells")
        return _unreadable(filename, cells[0].error), cells
    return {"filename": filename, "width": round(rgb.shape[1] * scale), "height": round(rgb.shape[0] * scale), "cells": as_dicts(cells),
            "overlay": _data_url(overlay(rgb, cells, predictor.class_names, scale))}, cells


def refuse_if_none_read(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """(filename, outcome) pairs back, unless no file could be read: then the first one's UploadError is the request's
    4xx. Otherwise each bad file becomes an ``error`` entry among the results (``failed``) and the others are answered."""
    errors = [outcome for _, outcome in pairs if isinstance(outcome, UploadError)]
    if pairs and len(errors) == len(pairs):
        raise errors[0]
    return pairs


def failed(err: UploadError) -> dict[str, Any]:
    return {"filename": err.filename, "error": err.reason, "status": err.status}


def _unreadable(filename: str, reason: str) -> UploadError:
    return UploadError(413 if "too large" in reason else 422, filename, reason)


async def read_uploads(files: list[UploadFile], max_bytes: int) -> list[tuple[str, bytes | UploadError]]:
    uploads: list[tuple[str, bytes | UploadError]] = []
    for upload in files:
        try:
            uploads.append((upload.filename or "", await read_upload(upload, max_bytes)))
        except UploadError as err:
            uploads.append((upload.filename or "", err))
    return uploads


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    name = upload.filename or ""
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if not content_type.startswith("image/") and content_type not in UNTYPED:
        raise UploadError(415, name, f"unsupported content type {content_type!r}; send JPEG, PNG, BMP, TIFF, WebP, AVIF or HEIC images")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UploadError(413, name, f"file larger than {max_bytes:,} bytes")
    return data


def decode_uploads(uploads: list[tuple[str, bytes | UploadError]], predictor: Predictor, max_pixels: int
                   ) -> list[tuple[str, tuple[np.ndarray, bool | None, bool] | UploadError]]:
    """Each upload as the model sees it (its crop or cell window, at its size), whether a cell was
    located and whether it was recoloured (see images.frame); or the UploadError that names what is wrong with it."""
    images: list[tuple[str, tuple[np.ndarray, bool | None, bool] | UploadError]] = []
    for name, data in uploads:
        try:
            images.append((name, data if isinstance(data, UploadError) else load_view(data, predictor.view, max_pixels)))
        except ImageReadError as err:
            images.append((name, _unreadable(name, str(err))))
    return images


def _data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def classify(predictor: Predictor, decoded: list[tuple[np.ndarray, bool | None, bool]], explainer: Explainer | None) -> list[dict[str, Any]]:
    images = [image for image, *_ in decoded]
    results = []
    for (image, found, recoloured), pred in zip(decoded, predictor.predict_arrays(images, [""] * len(images))):
        predictor.mark_recoloured(pred, recoloured)
        result = {"label": pred.label, "confidence": pred.confidence, "probabilities": pred.probabilities,
                  "preview": _data_url(image)}  # the region the model saw, in any accepted format
        if pred.in_domain is not None:
            result["ood_score"], result["in_domain"] = pred.ood_score, pred.in_domain
        if found is not None:
            result["localised"] = found
        if explainer is not None:
            result["heatmap"] = _data_url(explainer.overlay(image, predictor.class_names.index(pred.label)))
        results.append(result)
    return results


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on ``host``:``port``, bound before the app starts, so that a port in use is a one-line
    error naming it (uvicorn logged it after announcing the address, and exited with status 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:  # in use, not allowed (a port below 1024), or a host name that does not resolve
        reason = (err.strerror or str(err)).split(" (while attempting")[0]
        raise LeukoscopeError(f"cannot listen on {host}:{port}: {reason}; choose another --port or --host") from None


def addresses(host: str, port: int) -> tuple[str, str | None]:
    """(the address to open, a warning or None) for a service on ``host``:``port``. Beyond this machine (any host but a
    loopback one) anyone who reaches the port can send images and read the calls, over plain HTTP, without a login: said
    once at start. Listening on every interface (0.0.0.0, ::), the address to open is this machine's name."""
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
        local, everywhere = address.is_loopback, address.is_unspecified
    except ValueError:  # a host name
        local, everywhere = host == "localhost", False
    shown = socket.gethostname() if everywhere else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    if local:
        return url, None
    return url, (f"warning: --host {host} serves beyond this machine: anyone who can reach port {port} can send images and "
                 "read the calls, over plain HTTP and without a login; keep it on a network you trust, or behind a proxy "
                 "with TLS and authentication (--host 127.0.0.1, the default, serves this machine only)")


def serve(predictor: Predictor, name: str, sock: socket.socket) -> None:
    """Run the web app on a socket from ``listen`` until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(create_app(predictor, name), log_level="info")).run(sockets=[sock])

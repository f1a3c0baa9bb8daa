"""``leukoscope serve``: a FastAPI app with a JSON API and a drag-and-drop web page.

Uploads are read into memory with a byte limit, decoded with a pixel limit, and never written
to disk by this code (Starlette spools large multipart parts to the system temp directory).
Every bad upload is answered with a 4xx JSON error naming the file and the reason.
"""

from __future__ import annotations

import base64
import time
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from .. import __version__
from ..errors import LeukoscopeError
from ..explain import Explainer, png_bytes
from ..inference import Predictor
from ..io import ImageReadError, decode_bytes

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 25_000_000
MAX_FILES = 32
ACCEPTED_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff", "image/x-ms-bmp", "application/octet-stream", "")


class UploadError(Exception):
    def __init__(self, status: int, filename: str, reason: str):
        super().__init__(reason)
        self.status, self.filename, self.reason = status, filename, reason


def create_app(predictor: Predictor, name: str = "model", max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> FastAPI:
    app = FastAPI(title="Leukoscope", version=__version__, description="Blood-cell image classification: predictions, probabilities and Grad-CAM heatmaps.")
    explainer: list[Explainer | None] = []
    page = (resources.files("leukoscope.serve") / "static" / "index.html").read_text(encoding="utf-8")

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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "version": __version__}

    @app.get("/models")
    async def models() -> dict[str, Any]:
        meta = predictor.meta
        return {"models": [{"name": name, "kind": predictor.kind, "arch": meta.get("arch"), "classes": predictor.class_names,
                            "image_size": predictor.image_size, "temperature": predictor.temperature,
                            "test_metrics": meta.get("metrics", {}).get("test", {})}]}

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(..., description="one or several cell images"),
                      heatmap: bool = Query(False, description="add a Grad-CAM overlay PNG as a data URL")) -> dict[str, Any]:
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} files per request, got {len(files)}")
        images = [await read_upload(f, predictor.image_size, max_bytes, max_pixels, predictor.crop) for f in files]
        started = time.perf_counter()
        results = await run_in_threadpool(classify, predictor, images, get_explainer() if heatmap else None)
        for f, result in zip(files, results):
            result["filename"] = f.filename or ""
        return {"model": name, "results": results, "seconds": round(time.perf_counter() - started, 4)}

    return app


async def read_upload(upload: UploadFile, size: int, max_bytes: int, max_pixels: int, crop: float = 1.0) -> np.ndarray:
    name = upload.filename or ""
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_TYPES:
        raise UploadError(415, name, f"unsupported content type {content_type!r}; send JPEG, PNG, BMP or TIFF images")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UploadError(413, name, f"file larger than {max_bytes:,} bytes")
    try:
        return decode_bytes(data, size, max_pixels, crop)
    except ImageReadError as err:
        status = 413 if "too large" in str(err) else 422
        raise UploadError(status, name, str(err)) from None


def classify(predictor: Predictor, images: list[np.ndarray], explainer: Explainer | None) -> list[dict[str, Any]]:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    probs = predictor.predict_proba(batch)
    results = []
    for image, p in zip(images, probs):
        top = predictor.decide(p)
        result = {"label": predictor.class_names[top], "confidence": float(p[top]),
                  "probabilities": {c: float(v) for c, v in zip(predictor.class_names, p)}}
        if explainer is not None:
            overlay = explainer.overlay(image, top)
            result["heatmap"] = "data:image/png;base64," + base64.b64encode(png_bytes(overlay)).decode()
        results.append(result)
    return results


def serve(predictor: Predictor, name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(predictor, name), host=host, port=port, log_level="info")

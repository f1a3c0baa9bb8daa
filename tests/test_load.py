"""A small, bounded load test of the service on localhost: no 5xx, no memory growth."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest
from conftest import DATA, require

from leukoscope import load_model
from leukoscope.inference import bundled_models
from leukoscope.serve import create_app
from leukoscope.serve.loadtest import run_load_test


def test_service_under_concurrent_load():
    import uvicorn

    if "pbc" not in bundled_models():
        pytest.skip("bundled model pbc not built (make models)")
    images = sorted(require(DATA / "pbc").rglob("*.jpg"))[::300]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(load_model("pbc"), "pbc"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        process = psutil.Process()
        result = run_load_test(f"http://127.0.0.1:{port}/", images, clients=4, requests=160, rss=lambda: process.memory_info().rss)
    finally:
        server.should_exit = True
        thread.join(10)
    assert result["statuses"] == {"200": 160} and result["server_errors"] == 0
    assert result["rss_end_mb"] - result["rss_after_warmup_mb"] < 50
    assert result["p99_ms"] < 5000 and result["throughput_rps"] > 5  # no request queued for seconds, the service keeps up
    with pytest.raises(ValueError, match="only targets localhost"):
        run_load_test("http://example.com/", images, requests=1)

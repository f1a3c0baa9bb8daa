"""A bounded load test for ``leukoscope serve``: N clients, a fixed number of requests, localhost only."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def run_load_test(url: str, images: Sequence[Path], clients: int = 4, requests: int = 200,
                  rss: Callable[[], int] | None = None, timeout: float = 60.0) -> dict:
    """POST ``requests`` single-image predictions from ``clients`` threads; returns throughput,
    latency percentiles, status counts and the server's memory before/after (via ``rss``).

    Memory is sampled after a warm-up of 10% of the requests, so that lazy allocations
    (thread pools, allocator arenas) are not counted as growth.
    """
    import httpx

    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise ValueError(f"the load test only targets localhost, not {host!r}")
    payloads = [(p.name, p.read_bytes()) for p in images]
    latencies, statuses, lock = [], {}, threading.Lock()
    warmup = max(1, requests // 10)
    rss_warm: list[int] = []

    def one(i: int, client: httpx.Client) -> None:
        name, data = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        try:
            status = client.post(url.rstrip("/") + "/predict", files=[("files", (name, data, "image/jpeg"))], timeout=timeout).status_code
        except httpx.HTTPError:
            status = 0
        with lock:
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if len(latencies) == warmup and rss is not None:
                rss_warm.append(rss())

    def worker(indices: list[int]) -> None:
        with httpx.Client() as client:
            for i in indices:
                one(i, client)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, [list(range(c, requests, clients)) for c in range(clients)]))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "seconds": round(elapsed, 2), "throughput_rps": round(requests / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "server_errors": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
            "rss_after_warmup_mb": round(rss_warm[0] / 1e6, 1) if rss_warm else None,
            "rss_end_mb": round(rss() / 1e6, 1) if rss is not None else None}

"""Bounded load test of `leukoscope serve` on localhost; writes the LOADTEST block of docs/benchmarks.md.

Starts the server as a subprocess, sends a fixed number of single-image POST /predict requests
from 1, 4 and 8 concurrent clients, and reports throughput, p50/p99 latency, status codes and
the server's resident memory after warm-up and at the end. Not part of CI.

    .venv/bin/python benchmarks/load_test.py --model pbc --requests 400
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc import write_block  # noqa: E402

from leukoscope.serve.loadtest import run_load_test  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "leukoscope", "serve", model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            if httpx.get(url + "health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pbc")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    images = sorted((DATA / "pbc").rglob("*.jpg"))[::97]
    proc, url = start_server(args.model)
    server = psutil.Process(proc.pid)
    rows = []
    try:
        for clients in args.clients:
            result = run_load_test(url, images, clients=clients, requests=args.requests, rss=lambda: server.memory_info().rss)
            print(json.dumps(result))
            rows.append(result)
    finally:
        proc.terminate()
        proc.wait(10)
    lines = [f"_Measured {datetime.date.today()} by `benchmarks/load_test.py --model {args.model} --requests {args.requests}` "
             "(server and clients on the same 2 cores; one PBC JPEG per request, no heatmap)._", "",
             "| clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) | statuses | 5xx | server RSS after warm-up → end (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['statuses']} | {r['server_errors']} | {r['rss_after_warmup_mb']} → {r['rss_end_mb']} |")
    write_block("LOADTEST", "\n".join(lines))
    if any(r["server_errors"] for r in rows):
        raise SystemExit("server errors seen")


if __name__ == "__main__":
    main()

"""Serving under load: 16 client threads x 20 requests to the HTTP server on 127.0.0.1.

Each request opens a new connection and asks for one tiny-preset image (class label, raw .npy);
the server micro-batches them into one onnxruntime call (1 intra-op thread). Recorded per run:
p50 / p99 / max latency as the client sees it, throughput, and lost or non-200 answers (must be
0). Loopback only; bounded (320 requests). The pytest-benchmark time is the whole load run.

    python -m pytest bench/bench_serve.py --benchmark-enable --benchmark-json=bench/results/serve-cpu.json
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="serving needs the 'onnx' extra")

from sfd_fast import EDMDenoiser, UNetConfig, build_unet  # noqa: E402
from sfd_fast.models.networks import OneStepGenerator  # noqa: E402
from sfd_fast.serve import OnnxRuntimeRunner, to_onnx  # noqa: E402
from sfd_fast.serve.server import GenerationServer  # noqa: E402

CLIENTS, PER_CLIENT = 16, 20


def _post(address, body) -> int:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", "/generate", json.dumps(body))
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_serve_16_clients(benchmark, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "g.onnx"
    to_onnx(OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny")))).eval(), path,
            exporter="torchscript")
    srv = GenerationServer(OnnxRuntimeRunner(path, threads=1), port=0, max_batch=16, max_count=8).start()

    def client(i):
        out = []
        for k in range(PER_CLIENT):
            t0 = time.perf_counter()
            status = _post(srv.address, {"class": (i + k) % 10, "count": 1, "seed": i * 100 + k, "format": "raw"})
            out.append((status, time.perf_counter() - t0))
        return out

    def load():
        with ThreadPoolExecutor(CLIENTS) as pool:
            return [r for rs in pool.map(client, range(CLIENTS)) for r in rs]

    try:
        results = benchmark.pedantic(load, rounds=1, iterations=1)
    finally:
        srv.stop()
    lat = np.array([t for _, t in results]) * 1000
    wall = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "clients": CLIENTS, "requests": len(results), "ort_threads": 1,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()), "requests_per_s": len(results) / wall,
        "non_200": sum(s != 200 for s, _ in results),
    })
    assert benchmark.extra_info["non_200"] == 0

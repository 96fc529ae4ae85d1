"""Generation server on loopback with the onnxruntime runner: concurrency, bad requests, load, shutdown."""

from __future__ import annotations

import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sfd_fast.serve import OnnxRuntimeRunner
from sfd_fast.serve.server import GenerationServer


@pytest.fixture
def onnx_model(tiny_onnx_generator):
    return tiny_onnx_generator


@pytest.fixture
def server(onnx_model):
    srv = GenerationServer(OnnxRuntimeRunner(onnx_model[1], threads=1), port=0, max_batch=16, max_count=8).start()
    yield srv
    srv.stop()


def _request(srv, method, path, body=None):
    conn = http.client.HTTPConnection(*srv.address, timeout=30)
    conn.request(method, path, body=body if isinstance(body, (bytes, type(None))) else json.dumps(body))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data


def test_health_and_raw_matches_pytorch(server, onnx_model):
    g, _ = onnx_model
    status, _, body = _request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["num_classes"] == 10
    status, ctype, body = _request(server, "POST", "/generate", {"class": 3, "count": 2, "seed": 7, "format": "raw"})
    assert status == 200 and ctype == "application/x-npy"
    images = torch.from_numpy(np.load(io.BytesIO(body)))
    z = torch.randn(2, *g.denoiser.image_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = g(z, torch.tensor([3, 3]))
    assert images.shape == (2, 1, 8, 8) and (images - ref).abs().max() <= 1e-4


def test_png(server):
    status, ctype, body = _request(server, "POST", "/generate", {"class": 0, "count": 3})
    from PIL import Image
    assert status == 200 and ctype == "image/png" and Image.open(io.BytesIO(body)).size == (24, 8)


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"), ([1, 2], "JSON object"), ({}, "'class' is required"),
    ({"class": 10}, "[0, 9]"), ({"class": -1}, "[0, 9]"), ({"class": "3"}, "integer"), ({"class": True}, "integer"),
    ({"class": 1, "count": 9}, "[1, 8]"), ({"class": 1, "count": 0}, "[1, 8]"),
    ({"class": 1, "format": "jpeg"}, "format"), ({"class": 1, "prompt": "x"}, "unknown field"),
])
def test_bad_requests_are_400_with_a_message(server, body, needle):
    status, _, data = _request(server, "POST", "/generate", body)
    assert status == 400 and needle in json.loads(data)["error"]


def test_unknown_route_is_404(server):
    assert _request(server, "GET", "/nope")[0] == 404
    assert _request(server, "POST", "/health", {})[0] == 404


def test_load_200_requests_8_clients_no_errors_no_loss(server):
    def one(i):
        status, _, body = _request(server, "POST", "/generate",
                                   {"class": i % 10, "count": 1 + i % 4, "seed": i, "format": "raw"})
        return status, np.load(io.BytesIO(body)).shape[0] if status == 200 else body

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    assert [s for s, _ in results] == [200] * 200
    assert [n for _, n in results] == [1 + i % 4 for i in range(200)]
    stats = json.loads(_request(server, "GET", "/health")[2])
    assert stats["requests"] == 200 and stats["images"] == sum(1 + i % 4 for i in range(200))
    assert stats["batches"] < 200  # requests were micro-batched


def test_same_seed_same_images_regardless_of_batching(server):
    bodies = [_request(server, "POST", "/generate", {"class": 5, "count": 2, "seed": 11, "format": "raw"})[2]
              for _ in range(2)]
    with ThreadPoolExecutor(4) as pool:
        bodies += list(pool.map(lambda _: _request(server, "POST", "/generate",
                                                   {"class": 5, "count": 2, "seed": 11, "format": "raw"})[2], range(4)))
    arrays = [np.load(io.BytesIO(b)) for b in bodies]
    assert all(np.allclose(a, arrays[0], atol=1e-5) for a in arrays)


def test_full_queue_answers_503(onnx_model):
    class SlowRunner(OnnxRuntimeRunner):
        def __call__(self, z, c):
            import time
            time.sleep(0.3)
            return super().__call__(z, c)

    srv = GenerationServer(SlowRunner(onnx_model[1]), port=0, max_batch=1, max_count=1, queue_size=2).start()
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: _request(srv, "POST", "/generate", {"class": 1})[0], range(8)))
    finally:
        srv.stop()
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}

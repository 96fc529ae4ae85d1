"""Issue 19: the generation server under hostile or heavy clients, on 127.0.0.1 only.

Bad Content-Length, a stalled half-sent body, deeply nested JSON, too many connections, SIGTERM with requests
in flight (`sfd-fast serve` as a process), and a bounded 16-client load run. Every socket has a timeout.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="serving needs the 'onnx' extra")

from sfd_fast.serve import OnnxRuntimeRunner  # noqa: E402
from sfd_fast.serve.server import GenerationServer  # noqa: E402

CLIENT_TIMEOUT_S = 20  # no test waits longer than this on one socket


@pytest.fixture(scope="session")
def onnx_path(tiny_onnx_generator):
    return tiny_onnx_generator[1]


@pytest.fixture(scope="module")
def server(onnx_path):
    srv = GenerationServer(OnnxRuntimeRunner(onnx_path, threads=1), port=0, max_batch=16, max_count=8,
                           request_timeout_s=1.0, max_connections=32).start()
    yield srv
    srv.stop()


def _raw(address, data: bytes, wait_s: float = CLIENT_TIMEOUT_S) -> bytes:
    """Send ``data`` as is, read until the server closes (or ``wait_s``): the raw answer."""
    with socket.create_connection(address, timeout=wait_s) as s:
        s.sendall(data)
        return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _read_one_response(s: socket.socket) -> bytes:
    """One whole answer (headers and its Content-Length of body) off a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-answer: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def _post(address, body: dict, timeout: float = CLIENT_TIMEOUT_S) -> int:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("POST", "/generate", json.dumps(body))
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.parametrize("headers,code,needle", [
    ("Content-Length: -1\r\n", 400, "non-negative integer"),  # was rfile.read(-1): unbounded, hung without EOF
    ("", 411, "Content-Length is required"),
    ("Content-Length: 99999999999\r\n", 413, "over the 65536-byte limit"),
    ("Content-Length: abc\r\n", 400, "non-negative integer"),
    ("Content-Length: +5\r\n", 400, "non-negative integer"),
    ("Content-Length: 5\r\nContent-Length: 6\r\n", 400, "conflicting"),
    ("Transfer-Encoding: chunked\r\n", 411, "Transfer-Encoding"),
])
def test_bad_content_length_is_refused_without_reading(server, headers, code, needle):
    # The socket stays open for writing (no EOF): a server that reads unbounded would hang here.
    answer = _raw(server.address, f"POST /generate HTTP/1.1\r\nHost: x\r\n{headers}\r\n{{\"class\": 1}}".encode(),
                  wait_s=5)
    status, error = _status_and_error(answer)
    assert status == code and needle in error, answer


def test_stalled_half_sent_body_is_dropped_while_others_are_served(server):
    with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT_S) as stalled:
        stalled.sendall(b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"class": ')
        t0 = time.monotonic()
        assert _post(server.address, {"class": 2}) == 200  # served while the other connection stalls
        answer = _read_all(stalled)  # the server answers 408 and closes after request_timeout_s (1 s here)
        waited = time.monotonic() - t0
    status, error = _status_and_error(answer)
    print(f"stalled body dropped after {waited:.2f} s (request_timeout_s=1.0)")
    assert status == 408 and "not received within" in error and waited < 5


def test_stalled_headers_and_idle_connections_are_dropped(server):
    with socket.create_connection(server.address, timeout=CLIENT_TIMEOUT_S) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        t0 = time.monotonic()
        _read_all(s)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("body", [b"[" * 60000, b'{"a":' * 5000 + b"1" + b"}" * 5000])
def test_deeply_nested_json_is_400(server, body):
    answer = _raw(server.address, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
    status, error = _status_and_error(answer)
    assert status == 400 and "nested too deeply" in error
    assert _post(server.address, {"class": 1}) == 200  # and the server is still fine


def test_connections_over_the_limit_get_503(onnx_path):
    srv = GenerationServer(OnnxRuntimeRunner(onnx_path, threads=1), port=0, max_batch=4, max_count=4,
                           request_timeout_s=3.0, max_connections=2).start()
    held = [socket.create_connection(srv.address, timeout=CLIENT_TIMEOUT_S) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted, each holding a handler thread
        status, error = _status_and_error(_raw(srv.address, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", wait_s=5))
        assert status == 503 and "too many connections" in error
    finally:
        for s in held:
            s.close()
        srv.stop()
    assert threading.active_count() < 50


def test_sigterm_answers_every_in_flight_request_and_exits_0(onnx_path):
    """`sfd-fast serve` as a process: 8 connections accepted, their POSTs half sent, SIGTERM, then the rest of
    each body: all 8 answered 200, exit code 0, no abort."""
    n = 8
    proc = subprocess.Popen([sys.executable, "-m", "sfd_fast.cli", "serve", str(onnx_path), "--host", "127.0.0.1",
                             "--port", "0", "--max-count", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    socks = []
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
        body = json.dumps({"class": 3, "count": 2, "seed": 1, "format": "raw"}).encode()
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT_S)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # accepted and answered: the connection is live
            assert b"200 OK" in _read_one_response(s)
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
            socks.append(s)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the server polls for the signal every 0.5 s: it is draining now
        for s in socks:
            s.sendall(body[5:])
        answers = [_read_all(s) for s in socks]  # each closes after its answer (Connection: close while draining)
        out, err = proc.communicate(timeout=60)
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    statuses = [int(a.split()[1]) if a else None for a in answers]
    print(f"SIGTERM with {n} requests in flight: statuses {statuses}, exit code {proc.returncode}")
    assert statuses == [200] * n
    assert all(np.load(io.BytesIO(a.partition(b"\r\n\r\n")[2])).shape == (2, 1, 8, 8) for a in answers)
    assert proc.returncode == 0 and "stopped" in out, err
    assert "terminate called" not in err, err


def test_load_16_clients_x_20_requests_no_loss(server):
    """Bounded load: 16 threads x 20 requests, a new connection each; p50/p99 printed, nothing lost."""
    assert server.httpd.request_queue_size >= 128  # was socketserver's 5: ~1 s p99 connects under 16 clients
    clients, per_client = 16, 20

    def client(i):
        out = []
        for k in range(per_client):
            t0 = time.perf_counter()
            status = _post(server.address, {"class": (i + k) % 10, "count": 1, "seed": i * 100 + k, "format": "raw"})
            out.append((status, time.perf_counter() - t0))
        return out

    before = json.loads(_get_health(server))["requests"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = np.array([t for _, t in results]) * 1000
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    print(f"load {clients} clients x {per_client} requests on 127.0.0.1 ({os.cpu_count()} CPUs): p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms, max {lat.max():.1f} ms, {len(results) / wall:.0f} req/s, "
          f"non-200: {sum(s != 200 for s, _ in results)}")
    assert [s for s, _ in results] == [200] * (clients * per_client)
    assert json.loads(_get_health(server))["requests"] - before == clients * per_client


def _get_health(srv) -> bytes:
    conn = http.client.HTTPConnection(*srv.address, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().read()
    finally:
        conn.close()

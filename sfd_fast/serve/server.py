"""Generation HTTP server: POST /generate, GET /health; requests micro-batched onto one runner.

One worker thread owns the runner (runners are not assumed thread-safe) and batches queued requests
up to ``max_batch`` images or ``max_wait_ms``. The queue is bounded: when full, /generate answers 503.
Every connection is bounded too: a body needs an exact Content-Length of at most ``MAX_BODY_BYTES``, each
request must arrive within ``request_timeout_s``, and at most ``max_connections`` are open at once.
One code path serves class labels and prompts: a class-conditional runner takes ``{"class": k}``,
a text-to-image runner (one with ``encode_prompts``) takes ``{"prompt": "..."}``.
Forgotten classes and concepts are served like any other: the response is what the model now generates.
"""

from __future__ import annotations

import io
import json
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

FORMATS = ("png", "raw")
MAX_PROMPT_CHARS = 1000  # longer prompts are refused (the tokenizer truncates to its context anyway)
MAX_BODY_BYTES = 1 << 16  # a /generate body is a few dozen bytes; anything larger is refused with 413
LISTEN_BACKLOG = 128  # socketserver's default of 5 gave ~1 s p99 connect times under 16 clients (issue 19)
_DIGITS = re.compile(r"[0-9]+")  # int() would also take "+5", " 5", "5_0"


class BadRequest(ValueError):
    pass


class _HTTPError(Exception):
    """An answer to send before the body was read: the connection is closed after it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def body_length(headers, limit: int = MAX_BODY_BYTES) -> int:
    """The body size from the request headers; raises _HTTPError (411, 400 or 413) rather than read unbounded."""
    if headers.get("Transfer-Encoding"):
        raise _HTTPError(411, "Transfer-Encoding is not supported; send the JSON body with a Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise _HTTPError(411, "Content-Length is required (the byte length of the JSON body)")
    if len(set(v.strip() for v in values)) > 1:
        raise _HTTPError(400, f"conflicting Content-Length headers {values}")
    value = values[0].strip()
    if not _DIGITS.fullmatch(value):
        raise _HTTPError(400, f"Content-Length must be a non-negative integer, got {value[:40]!r}")
    if int(value) > limit:
        raise _HTTPError(413, f"body of {int(value)} bytes is over the {limit}-byte limit")
    return int(value)


@dataclass
class _Job:
    condition: int | str  # a class label, or a prompt
    count: int
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    images: torch.Tensor | None = None
    error: str | None = None


def parse_request(body: bytes, num_classes: int | None, max_count: int, prompts: bool = False) -> dict:
    """Validate a /generate JSON body -> {class or prompt, count, seed, format}; raises BadRequest naming the problem.

    ``prompts``: the model is text-to-image and takes "prompt" (a non-empty string) instead of "class".
    """
    key = "prompt" if prompts else "class"
    example = '{"prompt": "a photo of a cat"' if prompts else '{"class": 3'

    try:
        req = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}")
    except RecursionError:  # e.g. 60000 nested "[": the decoder recurses once per level
        raise BadRequest("body is nested too deeply to be a /generate request") from None
    if not isinstance(req, dict):
        raise BadRequest(f'body must be a JSON object like {example}, "count": 4, "seed": 0, "format": "png"}}')
    unknown = set(req) - {key, "count", "seed", "format"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}; allowed: {key}, count, seed, format")

    def integer(name, default, lo, hi):
        v = req.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadRequest(f"{name!r} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise BadRequest(f"{name!r} must be in [{lo}, {hi}], got {v}")
        return v

    if prompts:
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest(f"'prompt' is required: a non-empty string, got {prompt!r}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"'prompt' has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        condition = prompt
    else:
        if "class" not in req:
            raise BadRequest(f"'class' is required (an integer in [0, {num_classes - 1}])")
        condition = integer("class", None, 0, num_classes - 1)
    out = {key: condition, "count": integer("count", 1, 1, max_count),
           "seed": integer("seed", 0, 0, 2**63 - 1), "format": req.get("format", "png")}
    if out["format"] not in FORMATS:
        raise BadRequest(f"'format' must be one of {list(FORMATS)}, got {out['format']!r}")
    return out


def to_png(images: torch.Tensor) -> bytes:
    """(N, C, H, W) in [-1, 1] -> one PNG, the N images side by side."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    strip = x.permute(2, 0, 3, 1).reshape(x.shape[2], -1, x.shape[1]).numpy()  # H, N*W, C
    img = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_npy(images: torch.Tensor) -> bytes:
    """(N, C, H, W) float32 in [-1, 1] as .npy bytes (np.load(io.BytesIO(body)))."""
    buf = io.BytesIO()
    np.save(buf, images.detach().cpu().float().numpy(), allow_pickle=False)
    return buf.getvalue()


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a real backlog, at most ``max_connections`` handler threads, and handler
    threads that are joined (not daemon) so that ``server_close()`` waits for every accepted request."""

    request_queue_size = LISTEN_BACKLOG
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, handler, max_connections: int, timeout_s: float):
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections, self.request_timeout_s = max_connections, timeout_s
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):  # answered from the accept loop, never a thread per client
            try:
                request.settimeout(1.0)
                body = json.dumps({"error": f"too many connections (limit {self.max_connections}), retry later"})
                request.sendall(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class GenerationServer:
    """``GenerationServer(runner).start()`` serves on ``self.address``; ``stop()`` drains and joins.

    ``request_timeout_s``: the longest a client may take to send a request's headers, or (separately) its body,
    or to read the answer; a stalled client is dropped (408 when its body stalled). ``max_connections``: open
    connections beyond it are answered 503 at once.
    """

    def __init__(self, runner, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 64,
                 max_wait_ms: float = 5.0, max_count: int = 64, queue_size: int = 256, timeout_s: float = 60.0,
                 request_timeout_s: float = 10.0, max_connections: int = 128):
        self.prompts = hasattr(runner, "encode_prompts")
        if not self.prompts and runner.num_classes is None:
            raise ValueError(f"the {runner.name} model takes neither class labels (its sidecar has no num_classes) nor "
                             "prompts (no text encoder exported with it); serve takes a class-conditional export, or "
                             "a text-to-image .onnx written by `sfd-fast export --generator <text-to-image generator "
                             "folder>` (text encoder and VAE decoder beside it)")
        # z's shape: the latents of a text-to-image model, else the images themselves
        self.noise_shape = tuple(getattr(runner, "noise_shape", runner.image_shape))
        if min(max_batch, max_count, queue_size, max_connections) < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch, max_count, queue_size and max_connections must be >= 1 and max_wait_ms "
                             f">= 0, got {max_batch}, {max_count}, {queue_size}, {max_connections} and {max_wait_ms}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if max_count > max_batch:
            raise ValueError(f"max_count ({max_count}) must not exceed max_batch ({max_batch})")
        self.runner, self.max_batch, self.max_wait = runner, max_batch, max_wait_ms / 1000
        self.max_count, self.timeout_s = max_count, timeout_s
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "rejected_full": 0}
        self.request_timeout_s = request_timeout_s
        self.httpd = _BoundedHTTPServer((host, port), self._handler(), max_connections, request_timeout_s)
        self.address = self.httpd.server_address[:2]
        self._worker = threading.Thread(target=self._work, name="sfd-generate-worker", daemon=True)
        self._http = threading.Thread(target=self.httpd.serve_forever, name="sfd-http", daemon=True)
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        pending = None
        while True:
            job = pending or self.jobs.get()
            pending = None
            if job is None:
                return
            batch, n, deadline = [job], job.count, time.monotonic() + self.max_wait
            while n < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None or n + nxt.count > self.max_batch:
                    pending = nxt if nxt is not None else None
                    if nxt is None:
                        self.jobs.put(None)  # seen after this batch, so queued work is drained first
                    break
                batch.append(nxt)
                n += nxt.count
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            # Noise from each request's own seed, so results do not depend on how requests were batched.
            z = torch.cat([torch.randn(j.count, *self.noise_shape, generator=torch.Generator().manual_seed(j.seed))
                           for j in batch])
            if self.prompts:  # each distinct prompt encoded once per batch, its rows repeated per image
                c = self.runner.encode_prompts([j.condition for j in batch for _ in range(j.count)])
            else:
                c = torch.cat([torch.full((j.count,), j.condition, dtype=torch.int64) for j in batch])
            images = self.runner(z, c).cpu()
            self.stats["batches"] += 1
            for j, part in zip(batch, images.split([j.count for j in batch])):
                j.images = part
        except Exception as exc:  # report to every waiting client rather than kill the worker
            for j in batch:
                j.error = f"generation failed: {exc}"
        for j in batch:
            j.done.set()

    # ------------------------------------------------------------------ http
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.request_timeout_s  # socket timeout: a stalled or idle connection is dropped

            def log_message(self, *args):  # quiet by default; stats are on /health
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None,
                      close: bool = False):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                if close or server._stopping.is_set():  # draining: one answer per accepted connection, then close
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, obj: dict, close: bool = False):
                self._send(code, json.dumps(obj).encode(), close=close)

            def _read_body(self, length: int) -> bytes:
                """Exactly ``length`` bytes within request_timeout_s in all, not per recv: a drip-feed stalls too."""
                deadline, parts, got = time.monotonic() + server.request_timeout_s, [], 0
                try:
                    while got < length:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError
                        self.connection.settimeout(left)
                        chunk = self.rfile.read1(length - got)
                        if not chunk:
                            raise _HTTPError(400, f"body ended after {got} of {length} bytes (Content-Length)")
                        parts.append(chunk)
                        got += len(chunk)
                except TimeoutError:
                    raise _HTTPError(408, f"body not received within {server.request_timeout_s}s "
                                          f"({got} of {length} bytes)") from None
                finally:
                    self.connection.settimeout(server.request_timeout_s)
                return b"".join(parts)

            def do_GET(self):
                if self.path != "/health":
                    return self._json(404, {"error": f"no route GET {self.path}; try GET /health or POST /generate"})
                self._json(200, {"status": "stopping" if server._stopping.is_set() else "ok",
                                 "backend": server.runner.name, "condition": "prompt" if server.prompts else "class",
                                 "num_classes": server.runner.num_classes,
                                 "image_shape": list(server.runner.image_shape),
                                 "noise_shape": list(server.noise_shape), "max_count": server.max_count,
                                 "queue": server.jobs.qsize(), **server.stats})

            def do_POST(self):
                if self.path != "/generate":
                    return self._json(404, {"error": f"no route POST {self.path}; try POST /generate"})
                try:
                    body = self._read_body(body_length(self.headers))
                except _HTTPError as exc:  # the rest of the body, if any, is unread: close after answering
                    try:
                        return self._json(exc.code, {"error": str(exc)}, close=True)
                    except OSError:  # the client is gone or not reading either
                        self.close_connection = True
                        return
                try:
                    req = parse_request(body, server.runner.num_classes, server.max_count, server.prompts)
                except (BadRequest, ValueError) as exc:
                    return self._json(400, {"error": str(exc)})
                # A request read after SIGTERM came on a connection accepted before it: it is answered, not 503.
                job = _Job(req["prompt" if server.prompts else "class"], req["count"], req["seed"])
                try:
                    server.jobs.put_nowait(job)
                except queue.Full:
                    server.stats["rejected_full"] += 1
                    return self._json(503, {"error": "queue full, retry later"})
                if not job.done.wait(server.timeout_s):
                    return self._json(504, {"error": f"generation took over {server.timeout_s}s"})
                if job.error:
                    return self._json(500, {"error": job.error})
                server.stats["requests"] += 1
                server.stats["images"] += job.count
                headers = {"X-Count": job.count, "X-Seed": job.seed}
                if not server.prompts:  # a prompt is not echoed: headers are latin-1 only
                    headers["X-Class"] = job.condition
                if req["format"] == "png":
                    return self._send(200, to_png(job.images), "image/png", headers)
                self._send(200, to_npy(job.images), "application/x-npy", headers)

        return Handler

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "GenerationServer":
        self._worker.start()
        self._http.start()
        return self

    def stop(self) -> None:
        """Stop accepting connections, answer every request on the connections already accepted, join all threads.

        Order matters: the worker keeps running while the handler threads are joined (``server_close`` waits for
        them, at most request_timeout_s for a client still sending, timeout_s for generation), and only then is it
        told to finish; no thread of ours is left when this returns (an onnxruntime call still running at
        interpreter exit aborted the process: "terminate called without an active exception").
        """
        self._stopping.set()
        if self._http.is_alive():
            self.httpd.shutdown()  # the accept loop ends; connections already accepted keep their threads
        self.httpd.server_close()  # closes the listening socket, then joins every handler thread
        if self._worker.is_alive():
            self.jobs.put(None)  # seen after the queued jobs
            self._worker.join()
        self._http.join()

    def serve_until_signal(self) -> None:
        """Block until SIGINT/SIGTERM, then stop cleanly (main thread only)."""
        import signal

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        while not stop.wait(0.5):
            pass
        self.stop()

"""Serving a text-to-image export (issue 16 item 2): prompt -> tokenizer -> text encoder -> G -> VAE decoder,
every network in onnxruntime, on 127.0.0.1; the images equal the torch pipeline's."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra")
pytest.importorskip("onnxruntime", reason="serving needs the 'onnx' extra")

from sfd_fast.cli.main import main  # noqa: E402
from sfd_fast.models.latent_denoiser import LatentDenoiser  # noqa: E402
from sfd_fast.models.networks import OneStepGenerator  # noqa: E402
from sfd_fast.models.sd_pipeline import load_t2i_pipeline  # noqa: E402
from sfd_fast.models.tiny_sd import build_tiny_pipeline  # noqa: E402
from sfd_fast.serve import load_runner  # noqa: E402
from sfd_fast.serve.runners import TextToImageRunner  # noqa: E402
from sfd_fast.serve.server import GenerationServer  # noqa: E402
from sfd_fast.train.text_to_image import load_t2i_generator, sample_t2i, save_t2i_generator  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A CFG text-to-image generator folder exported by `sfd-fast export` (G + text encoder + VAE decoder)."""
    root = tmp_path_factory.mktemp("t2i")
    pipe_dir = build_tiny_pipeline(root / "pipe")
    pipe = load_t2i_pipeline(pipe_dir)
    generator = OneStepGenerator(LatentDenoiser(pipe.unet, pipe.scheduler_config, 2.0,
                                                pipe.encode_prompts(["blurry"])), 2.5)
    folder = save_t2i_generator(generator, pipe_dir, root / "generator", negative_prompt="blurry")
    assert main(["export", "--generator", str(folder), "--out", str(root / "g.onnx"), "--exporter", "torchscript"]) == 0
    return root / "g.onnx", load_t2i_generator(folder)


def _request(address, method, path, body=None):
    conn = http.client.HTTPConnection(*address, timeout=60)
    conn.request(method, path, body=body if isinstance(body, (bytes, type(None))) else json.dumps(body))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data


@pytest.fixture(scope="module")
def server(export):
    srv = GenerationServer(TextToImageRunner(export[0], threads=1), port=0, max_batch=8, max_count=4).start()
    yield srv
    srv.stop()


def test_load_runner_picks_the_text_to_image_runner(export):
    runner = load_runner(export[0])
    assert isinstance(runner, TextToImageRunner)
    assert runner.noise_shape == (4, 8, 8) and runner.image_shape == (3, 16, 16) and runner.num_classes is None


def test_served_prompt_images_equal_the_torch_pipeline(server, export):
    generator, pipeline = export[1]
    for prompt, count, seed in (("a photo of a cat", 2, 3), ("brad pitt", 1, 0)):
        status, ctype, body = _request(server.address, "POST", "/generate",
                                       {"prompt": prompt, "count": count, "seed": seed, "format": "raw"})
        assert status == 200 and ctype == "application/x-npy", body
        images = torch.from_numpy(np.load(io.BytesIO(body)))
        expected = sample_t2i(generator, pipeline, [prompt] * count, seed=seed)
        err = float((images - expected).abs().max())
        print(f"served {prompt!r} x{count}: max abs error vs torch sample_t2i {err:.2e}")
        assert images.shape == (count, 3, 16, 16) and err <= TOL


def test_concurrent_prompts_are_batched_and_seeded_per_request(server):
    bodies = {}

    def one(i):
        prompt = ["a cat", "a dog", "a red car"][i % 3]
        status, _, body = _request(server.address, "POST", "/generate",
                                   {"prompt": prompt, "count": 1 + i % 2, "seed": i % 3, "format": "raw"})
        return i, status, body

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    assert all(status == 200 for _, status, _ in results)
    for i, _, body in results:
        bodies.setdefault((i % 3, 1 + i % 2), []).append(np.load(io.BytesIO(body)))
    for arrays in bodies.values():  # same prompt, count and seed -> same images however they were batched
        assert all(np.allclose(a, arrays[0], atol=1e-5) for a in arrays)
    assert json.loads(_request(server.address, "GET", "/health")[2])["condition"] == "prompt"


def test_png_and_health(server):
    status, ctype, body = _request(server.address, "POST", "/generate", {"prompt": "a cat", "count": 3})
    from PIL import Image
    assert status == 200 and ctype == "image/png" and Image.open(io.BytesIO(body)).size == (48, 16)
    health = json.loads(_request(server.address, "GET", "/health")[2])
    assert health["image_shape"] == [3, 16, 16] and health["noise_shape"] == [4, 8, 8] and health["num_classes"] is None


@pytest.mark.parametrize("body,needle", [
    ({}, "'prompt' is required"), ({"prompt": ""}, "non-empty"), ({"prompt": 3}, "non-empty string"),
    ({"prompt": "x" * 1001}, "at most 1000"), ({"class": 3}, "allowed: prompt"), ({"prompt": "a", "count": 5}, "[1, 4]"),
])
def test_bad_prompt_requests_are_400(server, body, needle):
    status, _, data = _request(server.address, "POST", "/generate", body)
    assert status == 400 and needle in json.loads(data)["error"]


def test_missing_part_is_a_clear_error(export, tmp_path):
    import shutil

    for f in export[0].parent.iterdir():
        if f.name.startswith("g."):
            (shutil.copytree if f.is_dir() else shutil.copy)(f, tmp_path / f.name)
    (tmp_path / "g.vae_decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="g.vae_decoder.onnx"):
        load_runner(tmp_path / "g.onnx")


def test_sfd_fast_serve_answers_a_prompt_on_loopback(export):
    """The must-show: `sfd-fast serve g.onnx` as a process on 127.0.0.1, one prompt request, SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "sfd_fast.cli", "serve", str(export[0]), "--host", "127.0.0.1",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert "prompts" in line, line + proc.stderr.read() if proc.poll() is not None else line
        host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
        assert host == "127.0.0.1"
        status, ctype, body = _request((host, int(port)), "POST", "/generate",
                                       {"prompt": "a photo of a cat", "count": 2, "seed": 5, "format": "raw"})
        assert status == 200 and ctype == "application/x-npy"
        generator, pipeline = export[1]
        err = float((torch.from_numpy(np.load(io.BytesIO(body))) - sample_t2i(generator, pipeline,
                                                                              ["a photo of a cat"] * 2, seed=5)).abs().max())
        print(f"sfd-fast serve (subprocess) prompt request: max abs error vs torch {err:.2e}")
        assert err <= TOL
        proc.send_signal(signal.SIGTERM)
        out, err_text = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out, err_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

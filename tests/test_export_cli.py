"""`sfd-fast export` then `sfd-fast serve` as a real process, stopped with SIGTERM."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys

import torch

from sfd_fast import EDMDenoiser, UNetConfig, build_unet
from sfd_fast.cli.main import main
from sfd_fast.models.networks import OneStepGenerator, save_generator


def test_export_then_serve_then_sigterm(tmp_path, capsys):
    torch.manual_seed(0)
    save_generator(OneStepGenerator(EDMDenoiser(build_unet(UNetConfig.from_name("tiny")))), tmp_path / "gen")
    assert main(["export", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "g.onnx"),
                 "--exporter", "torchscript"]) == 0
    assert "max abs error" in capsys.readouterr().out
    proc = subprocess.Popen([sys.executable, "-m", "sfd_fast.cli", "serve", str(tmp_path / "g.onnx"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        host_port = line.split("http://")[1].split()[0]
        host, port = host_port.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/generate", json.dumps({"class": 2, "count": 2}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()[:4] == b"\x89PNG"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stopped" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()

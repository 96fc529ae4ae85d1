"""``sfd-fast export`` (generator -> ONNX, optionally a TensorRT engine) and ``sfd-fast serve`` (HTTP)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="export a generator checkpoint to ONNX (and a TensorRT engine)",
                       description="Export a generator directory written by save_generator / `sfd-fast distill` to "
                                   "ONNX, verified in onnxruntime; with --engine also build a TensorRT engine. "
                                   "A text-to-image generator folder (`distill --pipeline`) exports G(z, text "
                                   "embeddings) -> latents plus, beside --out, its text encoder and VAE decoder "
                                   "(<name>.text_encoder.onnx, <name>.vae_decoder.onnx) and tokenizer "
                                   "(<name>.tokenizer/), so that `sfd-fast serve` answers prompts.")
    p.add_argument("--generator", type=Path, required=True,
                   help="generator directory (class-conditional, or a text-to-image generator folder)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 14..20 (default: 18; TorchScript uses <= 17)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="ONNX exporter; dynamo falls back to torchscript on failure (default: dynamo)")
    p.add_argument("--engine", type=Path, default=None, help="also build a TensorRT engine here (needs tensorrt + GPU)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"], help="engine precision")
    p.add_argument("--max-batch", type=int, default=64, help="largest engine batch (default: 64)")
    p.set_defaults(handler=run_export, no_progress=True)

    p = sub.add_parser("serve", help="serve a .onnx or .engine over HTTP (POST /generate, GET /health)",
                       description="Serve an export of `sfd-fast export` over HTTP: class-conditional models take "
                                   '{"class": k}, text-to-image exports (G + text encoder + VAE decoder in '
                                   'onnxruntime) take {"prompt": "..."}; see docs/serving.md.')
    p.add_argument("model", type=Path, help=".onnx (onnxruntime) or .engine (TensorRT) file")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=64, help="images per micro-batch (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batch collection window (default: 5)")
    p.add_argument("--max-count", type=int, default=16, help="images per request limit (default: 16)")
    p.add_argument("--queue-size", type=int, default=256, help="queued requests before 503 (default: 256)")
    p.add_argument("--request-timeout-s", type=float, default=10.0,
                   help="a client stalled this long sending a request (or reading the answer) is dropped (default: 10)")
    p.add_argument("--max-connections", type=int, default=128,
                   help="open connections (one thread each) before new ones get 503 (default: 128)")
    p.set_defaults(handler=run_serve, no_progress=True)


def run_export(args) -> int:
    from ..models.networks import load_generator
    from ..serve import TensorRTUnavailable, build_engine, to_onnx
    from ..serve.onnx import t2i_to_onnx
    from ..train.text_to_image import is_t2i_generator, load_t2i_generator

    if args.out.suffix != ".onnx":
        raise ValueError(f"--out must name a .onnx file, got {str(args.out)!r}")
    if args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a directory; give a .onnx file path")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if not args.generator.is_dir():
        raise FileNotFoundError(f"--generator {str(args.generator)!r} is not a directory; give a generator folder "
                                "written by `sfd-fast distill` (…/generator)")
    if is_t2i_generator(args.generator):  # G(z, prompt embeddings (B, L, D)) -> latents, plus encoder and decoder
        generator, pipeline = load_t2i_generator(args.generator)
        results = t2i_to_onnx(generator, pipeline, args.out, opset=args.opset, exporter=args.exporter)
        result = results["generator"]
        for part in ("text_encoder", "vae_decoder"):
            print(f"wrote {results[part].path} (exporter {results[part].exporter}, "
                  f"max abs error vs PyTorch {results[part].max_abs_error:.2e})")
    else:
        result = to_onnx(load_generator(args.generator), args.out, opset=args.opset, exporter=args.exporter)
    print(f"wrote {result.path} (exporter {result.exporter}, opset {result.opset}, "
          f"max abs error vs PyTorch {result.max_abs_error:.2e})")
    if args.engine is not None:
        try:
            engine = build_engine(args.out, args.engine, precision=args.precision,
                                  batch_sizes=(1, min(16, args.max_batch), args.max_batch))
        except TensorRTUnavailable as exc:
            print(f"sfd-fast export: cannot build the engine: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {engine} ({args.precision})")
    return 0


def run_serve(args) -> int:
    from ..serve import TensorRTUnavailable, load_runner
    from ..serve.server import GenerationServer

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    try:
        runner = load_runner(args.model)
    except TensorRTUnavailable as exc:
        print(f"sfd-fast serve: {exc}", file=sys.stderr)
        return 2
    try:
        server = GenerationServer(runner, args.host, args.port, max_batch=args.max_batch,
                                  max_wait_ms=args.max_wait_ms, max_count=args.max_count, queue_size=args.queue_size,
                                  request_timeout_s=args.request_timeout_s, max_connections=args.max_connections)
    except OSError as exc:  # port in use, address not local, no permission
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    kind = "prompts" if server.prompts else f"classes 0..{runner.num_classes - 1}"
    print(f"serving {args.model} ({server.runner.name}, {kind}) on http://{server.address[0]}:{server.address[1]} "
          "- POST /generate, GET /health; Ctrl-C to stop", flush=True)
    server.serve_until_signal()
    print("stopped")
    return 0

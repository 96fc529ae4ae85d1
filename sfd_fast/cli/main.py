"""``sfd-fast``: command-line entry point. It only parses arguments and builds configs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.config import SFD_PRESETS, SFDConfig, parse_overrides
from ..models.unet import UNET_PRESETS, UNetConfig


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like '0' or '0,3', got {text!r}")


def _override(text: str) -> tuple[int, ...] | None:
    return None if text == "random" else _classes(text)


def _add_forget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget", type=_classes, default=(0,), metavar="C[,C..]",
                   help="class(es) to forget (default: 0)")
    p.add_argument("--override", type=_override, default=(1,), metavar="C[,C..]|random",
                   help="override class per forget class, or 'random' for a uniformly drawn remaining class "
                        "per sample (default: 1)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --- scale-out and reliability options of `distill` (sfd_fast.train.resilient, sfd_fast.train.distributed) ---
def add_resilience_args(p: argparse.ArgumentParser,
                        title: str = "checkpoints, resume and multi-GPU (see docs/distributed.md)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="where full-state checkpoints go (default: <out>/checkpoints when any option here is used)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a resumable checkpoint every N steps (default: 0 = at the end and on SIGTERM/SIGINT)")
    g.add_argument("--keep-last", type=int, default=3, metavar="N", help="checkpoints kept (default: 3)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (bit-exact on the same setup)")


def _wants_resilient_run(args) -> bool:
    import os

    return bool(args.resume or args.checkpoint_every or args.checkpoint_dir is not None
                or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def _distill_resilient(args, config: SFDConfig, progress: bool) -> int:
    """`distill` with checkpoints/resume/signals, on one process or every torchrun rank."""
    import os

    from ..train import distributed
    from ..io.atomic import write_json
    from ..core.faults import NonFiniteError
    from ..models.networks import load_denoiser, save_generator
    from ..train.resilient import run_resilient
    from ..core.state import SFDState

    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one rank per process
        device = distributed.init_from_env("gloo" if args.device == "cpu" else "nccl")
    state = None
    try:
        state = SFDState.create(config, load_denoiser(args.teacher, device), device)
        distributed.distribute_state(state, "ddp")
        root = args.checkpoint_dir or args.out / "checkpoints"
        say = print if distributed.is_main() else (lambda *a, **k: None)
        try:
            result = run_resilient(state, args.steps, checkpoint_root=root, checkpoint_every=args.checkpoint_every,
                                   keep_last=args.keep_last, resume=args.resume, backend=args.backend,
                                   on_log=(lambda step, m: say(f"step {step}: " + " ".join(
                                       f"{k}={v:.4g}" for k, v in sorted(m.items())))) if progress else None)
        except NonFiniteError as exc:
            print(f"sfd-fast distill: stopped: {exc}", file=sys.stderr)
            return 3
        if result.report_start_and_stop(say):
            return 0
        if distributed.is_main():
            args.out.mkdir(parents=True, exist_ok=True)
            save_generator(state.generator_ema, args.out / "generator")
            write_json(config.to_dict(), args.out / "config.json")
            write_json({"log": result.log}, args.out / "train_log.json")
            say(f"saved generator to {args.out / 'generator'}; checkpoint {result.checkpoint}")
        return 0
    finally:
        distributed.shutdown(state)
# --- end of scale-out and reliability options ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfd-fast", description=(
        "Score Forgetting Distillation: distil a class-conditional diffusion model into a one-step "
        "generator that no longer generates the forgotten classes."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole story on the embedded MNIST subset (CPU, minutes)",
                       description="Load the committed teacher and classifier, forget a class with SFD, "
                                   "evaluate, and write metrics.json, PNG grids and the generator to --out.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="SFD iterations (default: the demo's measured budget)")
    p.add_argument("--per-class", type=int, default=100, help="evaluation samples per class (default: 100)")
    p.add_argument("--teacher-steps", type=int, default=18,
                   help="Heun steps of the teacher sampler; NFE = 2*steps-1 (default: 18)")
    _add_forget_args(p)
    _add_common(p)

    p = sub.add_parser("pretrain-teacher", help="train a class-conditional EDM teacher on the embedded data",
                       description="Train the teacher with the EDM loss on the embedded MNIST subset and save "
                                   "it (diffusers config + safetensors) to --out.")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--preset", default="demo", choices=sorted(UNET_PRESETS), help="UNet preset (default: demo)")
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (default: 4000)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    _add_common(p)

    p = sub.add_parser("train-classifier", help="train the evaluation classifier on the embedded data",
                       description="Train the small CNN that scores generated digits; saves safetensors.")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.add_argument("--resolution", type=int, default=16, help="image side (default: 16)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    _add_common(p)

    p = sub.add_parser("distill", help="run SFD on a teacher from a local directory",
                       description="Distil a teacher (a directory written by pretrain-teacher/save_denoiser, or a "
                                   "diffusers DDPM pipeline with unet/ and scheduler/) into a one-step generator "
                                   "that forgets --forget. Hyperparameters start from --preset and --config.")
    p.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    p.add_argument("--pipeline", type=Path, metavar="DIR",
                   help="text-to-image mode on a diffusers SD-style folder; see `sfd-fast distill --pipeline DIR --help`")
    p.add_argument("--out", type=Path, required=True, help="output folder (generator/, config.json, train_log.json)")
    p.add_argument("--steps", type=int, default=1000, help="SFD iterations (default: 1000)")
    p.add_argument("--preset", default="reference", choices=sorted(SFD_PRESETS),
                   help="SFD hyperparameter preset (default: reference)")
    p.add_argument("--config", type=Path, help="JSON file of SFDConfig fields overriding the preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one SFDConfig field (JSON value), e.g. --set lr_gen=1e-4; repeatable")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda"],
                   help="loss implementation (default: $SFD_FAST_BACKEND or auto)")
    add_resilience_args(p)
    _add_forget_args(p)
    _add_common(p)

    # --- text-to-image: one-step samples from a `distill --pipeline` generator (t2i_cli.py)
    from .text_to_image import add_evaluate_parser, add_sample_parser

    add_sample_parser(sub)
    add_evaluate_parser(sub)

    p = sub.add_parser("evaluate", help="score a generator or a teacher sampler with the classifier",
                       description="Forget/override/remain accuracy of a one-step generator (--generator) or a "
                                   "teacher's Heun sampler (--teacher); writes metrics.json and a class grid.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--generator", type=Path, help="generator directory written by distill/demo")
    who.add_argument("--teacher", type=Path, help="teacher model directory (sampled with Heun)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier .safetensors (default: embedded)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=100, help="samples per class (default: 100)")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps for --teacher (default: 18)")
    _add_forget_args(p)
    _add_common(p)

    # --- compare (issue 7): every unlearning method through one evaluation ----------------------
    p = sub.add_parser("compare", help="compare unlearning methods on one evaluation (table + plots)",
                       description="Train the chosen methods (teacher, sid, sfd, robust_sfd, esd, retain_distill, "
                                   "advunlearn) with fixed seeds and budgets and write compare.md/.json/.csv/.png "
                                   "plus per-method sample grids to --out.")
    p.add_argument("--teacher", type=Path, default=None, help="teacher directory (default: embedded demo teacher)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier .safetensors (default: embedded)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    p.add_argument("--methods", default="teacher,sid,sfd,robust_sfd,esd,retain_distill,advunlearn",
                   help="comma-separated methods (default: all)")
    p.add_argument("--preset", default="reference", choices=sorted(SFD_PRESETS), help="SFD preset (default: reference)")
    p.add_argument("--config", type=Path, help="JSON file of SFDConfig fields overriding the preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one SFDConfig field (JSON value); repeatable")
    p.add_argument("--distill-steps", type=int, default=100, help="iterations of sid/sfd/robust_sfd (default: 100)")
    p.add_argument("--finetune-steps", type=int, default=50, help="iterations of esd/retain_distill/advunlearn (default: 50)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam lr of the fine-tuning baselines (default: 1e-4)")
    p.add_argument("--finetune-batch", type=int, default=8, help="forget (and retain) batch of fine-tuning (default: 8)")
    p.add_argument("--robust-inner-steps", type=int, default=3, help="robust_sfd inner attack steps (default: 3)")
    p.add_argument("--teacher-steps", type=int, default=8, help="Heun steps of diffusion-sampled rows (default: 8)")
    p.add_argument("--attack-steps", type=int, default=30, help="embedding attack Adam steps (default: 30)")
    p.add_argument("--attack-lr", type=float, default=0.05, help="embedding attack lr (default: 0.05)")
    p.add_argument("--attack-init", default="forget", choices=["forget", "mean", "random"],
                   help="attack start: forget-class row, table mean, or random (default: forget)")
    p.add_argument("--attack-batch", type=int, default=16, help="noises per attack step (default: 16)")
    p.add_argument("--attack-samples", type=int, default=100, help="held-out noises scoring ASR (default: 100)")
    p.add_argument("--attack-sampler-steps", type=int, default=3,
                   help="differentiable Heun steps when attacking diffusion rows (default: 3)")
    p.add_argument("--per-class", type=int, default=50, help="evaluation samples per class (default: 50)")
    p.add_argument("--inception-onnx", type=Path, default=None,
                   help="local ONNX feature network for FID (e.g. Inception pool3); default: classifier features")
    _add_forget_args(p)
    _add_common(p)

    # --- export / serve (issue 5) ---
    p = sub.add_parser("export", help="export a generator checkpoint to ONNX (and a TensorRT engine)",
                       description="Export a generator directory written by save_generator / `sfd-fast distill` to "
                                   "ONNX, verified in onnxruntime; with --engine also build a TensorRT engine. "
                                   "A text-to-image generator folder (`distill --pipeline`) exports G(z, text "
                                   "embeddings) -> latents; encode prompts and decode latents with its pipeline.")
    p.add_argument("--generator", type=Path, required=True,
                   help="generator directory (class-conditional, or a text-to-image generator folder)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="ONNX exporter; dynamo falls back to torchscript on failure (default: dynamo)")
    p.add_argument("--engine", type=Path, default=None, help="also build a TensorRT engine here (needs tensorrt + GPU)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"], help="engine precision")
    p.add_argument("--max-batch", type=int, default=64, help="largest engine batch (default: 64)")
    p.set_defaults(no_progress=True)

    p = sub.add_parser("serve", help="serve a .onnx or .engine over HTTP (POST /generate, GET /health)")
    p.add_argument("model", type=Path, help=".onnx (onnxruntime) or .engine (TensorRT) file")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=64, help="images per micro-batch (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="micro-batch collection window (default: 5)")
    p.add_argument("--max-count", type=int, default=16, help="images per request limit (default: 16)")
    p.add_argument("--queue-size", type=int, default=256, help="queued requests before 503 (default: 256)")
    p.set_defaults(no_progress=True)
    return parser


def _sfd_config(args) -> SFDConfig:
    config = SFDConfig.from_name(args.preset).to_dict()
    if args.config is not None:
        config.update(json.loads(args.config.read_text()))
    config.update(parse_overrides(args.set))
    config.update(forget_classes=args.forget, override_classes=args.override, seed=args.seed)
    return SFDConfig.from_dict(config)


def main(argv: list[str] | None = None) -> int:
    # --- text-to-image: `distill --pipeline DIR` takes prompts, not class indices (t2i_cli.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["distill"] and any(a == "--pipeline" or a.startswith("--pipeline=") for a in argv):
        from .text_to_image import run_distill

        return run_distill(argv[1:])
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        return _run(args, progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sfd-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args, progress: bool) -> int:
    import torch

    from ..io.atomic import write_json

    if args.command == "export":
        from ..serve import build_engine, to_onnx
        from ..models.networks import load_generator
        from ..train.text_to_image import is_t2i_generator, load_t2i_generator

        if is_t2i_generator(args.generator):  # input "cond": prompt embeddings (B, L, D), output: latents
            generator, pipeline = load_t2i_generator(args.generator)
            cond = pipeline.encode_prompts(["a photo of a cat", ""])
        else:
            generator, cond = load_generator(args.generator), None
        result = to_onnx(generator, args.out, cond=cond, opset=args.opset, exporter=args.exporter)
        print(f"wrote {result.path} (exporter {result.exporter}, opset {result.opset}, "
              f"max abs error vs PyTorch {result.max_abs_error:.2e})")
        if args.engine is not None:
            from ..serve import TensorRTUnavailable
            try:
                engine = build_engine(args.out, args.engine, precision=args.precision,
                                      batch_sizes=(1, min(16, args.max_batch), args.max_batch))
            except TensorRTUnavailable as exc:
                print(f"sfd-fast export: cannot build the engine: {exc}", file=sys.stderr)
                return 2
            print(f"wrote {engine} ({args.precision})")
        return 0

    if args.command == "serve":
        from ..serve import load_runner
        from ..serve.server import GenerationServer

        from ..serve import TensorRTUnavailable
        try:
            runner = load_runner(args.model)
        except TensorRTUnavailable as exc:
            print(f"sfd-fast serve: {exc}", file=sys.stderr)
            return 2
        server = GenerationServer(runner, args.host, args.port, max_batch=args.max_batch,
                                  max_wait_ms=args.max_wait_ms, max_count=args.max_count, queue_size=args.queue_size)
        print(f"serving {args.model} ({server.runner.name}) on http://{server.address[0]}:{server.address[1]} "
              "- POST /generate, GET /health; Ctrl-C to stop", flush=True)
        server.serve_until_signal()
        print("stopped")
        return 0

    if args.command == "demo":
        from .demo import run_demo

        m = run_demo(args.out, steps=args.steps, seed=args.seed, forget=args.forget, override=args.override,
                     per_class=args.per_class, teacher_steps=args.teacher_steps, device=args.device,
                     progress=progress)
        print(f"one-step generator: forget_accuracy={m['forget_accuracy']:.3f} override_rate={m['override_rate']:.3f} "
              f"remain_accuracy={m['remain_accuracy']:.3f} (NFE 1)")
        print(f"teacher sampler:    remain_accuracy={m['teacher_remain_accuracy']:.3f} "
              f"forget_accuracy={m['teacher_forget_accuracy']:.3f} (NFE {m['teacher_nfe']})")
        print(f"steps={m['steps']} seconds={m['seconds']:.0f} acceptance={m['passed']}")
        print(f"wrote {args.out}/metrics.json, samples_generator.png, samples_teacher.png, generator/")
        return 0 if all(m["passed"].values()) else 1

    if args.command == "pretrain-teacher":
        from ..io.data import load_embedded_mnist
        from ..models.networks import save_denoiser
        from ..train.pretrain import pretrain_teacher

        unet_config = UNetConfig.from_name(args.preset)
        images, labels = load_embedded_mnist("train", unet_config.resolution)
        torch.manual_seed(args.seed)
        teacher = pretrain_teacher(images, labels, unet_config, steps=args.steps, batch_size=args.batch_size,
                                   lr=args.lr, seed=args.seed, progress=progress)
        save_denoiser(teacher, args.out)
        print(f"saved teacher to {args.out}")
        return 0

    if args.command == "train-classifier":
        from ..eval.classifier import train_classifier
        from ..io.data import load_embedded_mnist

        images, labels = load_embedded_mnist("train", args.resolution)
        model = train_classifier(images, labels, epochs=args.epochs, seed=args.seed, progress=progress)
        test_x, test_y = load_embedded_mnist("test", args.resolution)
        accuracy = (model.predict(test_x) == test_y).float().mean().item()
        model.save(args.out)
        print(f"saved classifier to {args.out}; test accuracy {accuracy:.4f} on {len(test_y)} held-out digits")
        return 0

    if args.command == "distill":
        from ..train.distill import distill
        from ..models.networks import load_denoiser, save_generator

        config = _sfd_config(args)
        if _wants_resilient_run(args):
            return _distill_resilient(args, config, progress)
        teacher = load_denoiser(args.teacher, args.device)
        log = []
        state = distill(teacher, config, args.steps, device=args.device, backend=args.backend, progress=progress,
                        on_log=lambda step, m: log.append({"step": step, **m}))
        args.out.mkdir(parents=True, exist_ok=True)
        save_generator(state.generator_ema, args.out / "generator")
        write_json(config.to_dict(), args.out / "config.json")
        write_json({"log": log}, args.out / "train_log.json")
        print(f"saved generator to {args.out / 'generator'}")
        return 0

    if args.command == "sample":  # text-to-image (t2i_cli.py)
        from .text_to_image import run_sample

        return run_sample(args)

    if args.command == "evaluate-t2i":
        from .text_to_image import run_evaluate

        return run_evaluate(args)

    if args.command == "evaluate":
        from ..eval.classifier import CLASSIFIER_FILE, DigitClassifier
        from ..eval.evaluate import class_grid, evaluate_sampler, teacher_sampler
        from ..core.forget import ForgetSpec
        from ..models.networks import load_denoiser, load_generator

        classifier = DigitClassifier.load(args.classifier or CLASSIFIER_FILE, args.device)
        if args.generator is not None:
            sampler = load_generator(args.generator, args.device)
            nfe, num_classes, shape = 1, sampler.denoiser.num_classes, sampler.denoiser.image_shape
        else:
            teacher = load_denoiser(args.teacher, args.device)
            sampler, nfe = teacher_sampler(teacher, args.teacher_steps)
            num_classes, shape = teacher.num_classes, teacher.image_shape
        spec = ForgetSpec(num_classes, args.forget, args.override)
        metrics = evaluate_sampler(sampler, nfe, classifier, spec, shape, per_class=args.per_class, seed=args.seed,
                                   device=args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(metrics, args.out / "metrics.json")
        class_grid(sampler, num_classes, 10, shape, args.out / "samples.png", device=args.device)
        print(json.dumps(metrics, indent=2))
        return 0

    if args.command == "compare":
        from dataclasses import replace

        from ..eval.attack import AttackConfig
        from ..eval.classifier import CLASSIFIER_FILE
        from ..eval.compare import CompareConfig
        from .compare import compare_main
        from .demo import TEACHER_DIR
        from ..baselines.finetune import FinetuneConfig
        from ..baselines.robust_sfd import RobustConfig

        torch.manual_seed(args.seed)
        sfd = _sfd_config(args)
        cfg = CompareConfig(
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), sfd=sfd,
            distill_steps=args.distill_steps, finetune_steps=args.finetune_steps,
            robust=RobustConfig(inner_steps=args.robust_inner_steps),
            finetune=replace(FinetuneConfig(), lr=args.finetune_lr, batch_size=args.finetune_batch,
                             retain_batch_size=args.finetune_batch, seed=args.seed),
            teacher_steps=args.teacher_steps,
            attack=AttackConfig(steps=args.attack_steps, lr=args.attack_lr, init=args.attack_init,
                                batch_size=args.attack_batch,
                                eval_samples=args.attack_samples, seed=args.seed),
            attack_sampler_steps=args.attack_sampler_steps, per_class=args.per_class, seed=args.seed)
        compare_main(args.teacher or TEACHER_DIR, args.classifier or CLASSIFIER_FILE, args.out, cfg,
                     inception_onnx=args.inception_onnx, device=args.device, progress=progress)
        print(f"wrote {args.out}/compare.md, compare.json, compare.csv, compare.png, samples_*.png")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

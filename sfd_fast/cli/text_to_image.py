"""Text-to-image commands: ``distill --pipeline DIR``, ``sample`` and ``evaluate-t2i``.

Only parses arguments and builds configs; ``cli.main`` routes here when ``distill`` gets
``--pipeline`` (its class-label ``--forget`` takes integers, the text one takes prompts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import (EXIT_INTERRUPTED, add_distributed_arg, add_overwrite_arg, add_resilience_args, check_device,
                   check_distributed)

DEFAULT_REMAIN = ("a photo of a cat", "a landscape painting", "a red car on a street", "a bowl of fruit",
                  "a woman reading a book", "a man riding a bicycle")


def build_distill_parser() -> argparse.ArgumentParser:
    from ..core.step_options import STEP_PRESETS

    p = argparse.ArgumentParser(prog="sfd-fast distill --pipeline", description=(
        "Text-to-image SFD: distil a local Stable-Diffusion-style pipeline folder into a one-step generator "
        "that maps each --forget concept to its --override. Modes: substitution over prompt templates "
        "(default), literal prompt pairs (--literal), or --keywords x --subjects (nudity style)."))
    p.add_argument("--pipeline", type=Path, required=True, help="diffusers pipeline folder (model_index.json, unet/, ...)")
    p.add_argument("--out", type=Path, required=True, help="output folder (generator/, config.json, train_log.json)")
    p.add_argument("--forget", action="append", default=[], metavar="TEXT",
                   help="concept (or, with --literal, prompt) to forget; repeatable, paired with --override")
    p.add_argument("--override", action="append", default=[], metavar="TEXT",
                   help="what replaces the matching --forget, e.g. 'a middle aged man'; repeatable")
    p.add_argument("--literal", action="store_true", help="use --forget/--override as whole prompts, no templates")
    p.add_argument("--templates", type=Path, help="file of prompt templates with one '{}' each (default: built-in)")
    p.add_argument("--keywords", help="comma-separated keywords to erase (keyword mode; also the negative prompt)")
    p.add_argument("--subjects", help="comma-separated subjects for keyword mode, e.g. 'woman,man'")
    p.add_argument("--remain-file", type=Path, help="remaining prompts, one per line (default: a built-in list)")
    p.add_argument("--negative-prompt", default=None, help="CFG negative prompt (default: '' or the keywords)")
    p.add_argument("--guidance-scale", type=float, default=4.5, help="CFG of teacher and fake score (default: 4.5)")
    p.add_argument("--generator-guidance-scale", type=float, default=1.0, help="CFG of the generator (default: 1)")
    p.add_argument("--prompt-drop", type=float, default=0.1, help="fake-score prompt dropout to '' (default: 0.1)")
    p.add_argument("--teacher-precision", choices=["fp32", "bf16"], default="fp32", help="teacher weight dtype")
    p.add_argument("--compute-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast of fake score and generator (weights stay as stored)")
    p.add_argument("--trained-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: fake score and generator weights stored in bf16, Adam on fp32 master copies")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations of generator, teacher and fake score in backward")
    p.add_argument("--step-options", choices=sorted(STEP_PRESETS), default="reference",
                   help="how train_step runs (speed, not math): reference eager, fused (same numbers), "
                        "bf16 (fused + autocast), fast (everything the device allows); see docs/fast_step.md")
    p.add_argument("--robust", action="store_true",
                   help="robust SFD: after each step, an inner attack on the forget prompts' text embeddings and "
                        "the SFD forget terms at those adversarial embeddings (sfd_fast/baselines/robust_sfd.py)")
    p.add_argument("--robust-inner-steps", type=int, default=3, help="inner attack steps with --robust (default: 3)")
    p.add_argument("--steps", type=int, default=100, help="SFD iterations (default: 100)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one SFDConfig field (JSON value) of the text-to-image preset; repeatable")
    p.add_argument("--log-every", type=int, default=10, help="pull metrics to the host every N steps (default: 10)")
    add_resilience_args(p, "checkpoints, resume and multi-GPU (bit-exact resume; SIGTERM/SIGINT save and exit; "
                           "under torchrun every rank trains with DDP, rank 0 writes)")
    add_distributed_arg(p)
    add_overwrite_arg(p, "--out's generator/")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _concepts(args):
    from ..core.prompts import DEFAULT_TEMPLATES, ConceptSpec, read_prompts

    remain = read_prompts(args.remain_file) if args.remain_file else DEFAULT_REMAIN
    if args.keywords or args.subjects:
        if args.forget or args.override:
            raise ValueError("give either --keywords/--subjects or --forget/--override, not both")
        split = [s.strip() for s in (args.keywords or "").split(",") if s.strip()]
        subjects = [s.strip() for s in (args.subjects or "").split(",") if s.strip()]
        spec = ConceptSpec.from_keywords(split, subjects, remain)
    else:
        if not args.forget or len(args.forget) != len(args.override):
            raise ValueError(f"--forget {args.forget} and --override {args.override} must be given in pairs "
                             "(at least one), or use --keywords/--subjects")
        templates = read_prompts(args.templates) if args.templates else DEFAULT_TEMPLATES
        if args.literal:
            spec = ConceptSpec.from_pairs(zip(args.forget, args.override), remain)
        else:
            pairs = [ConceptSpec.from_substitution(f, o, remain, templates) for f, o in zip(args.forget, args.override)]
            spec = ConceptSpec(sum((s.forget for s in pairs), ()), sum((s.override for s in pairs), ()), remain)
    if args.negative_prompt is not None:
        spec = ConceptSpec(spec.forget, spec.override, spec.remain, args.negative_prompt)
    return spec


def run_distill(argv: list[str]) -> int:
    args = build_distill_parser().parse_args(argv)
    try:
        return _distill(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sfd-fast distill: error: {exc}", file=sys.stderr)
        return 2


def _distill(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..baselines.robust_sfd import RobustConfig, robust_sfd_step
    from ..core.config import SFDConfig, parse_overrides
    from ..core.faults import NonFiniteError
    from ..core.step import train_step
    from ..io.atomic import check_replaceable, check_writable_dir, write_json
    from ..models.model_card import RunRecord
    from ..models.sd_pipeline import load_t2i_pipeline
    from ..train import distributed
    from ..train.resilient import run_resilient
    from ..train.text_to_image import T2I_SFD_CONFIG, T2IOptions, build_t2i_state, save_t2i_generator

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    check_device(args.device)
    join_group = check_distributed(args)
    config = T2I_SFD_CONFIG.to_dict()
    config.update(parse_overrides(args.set))
    config = SFDConfig.from_dict({**config, "seed": args.seed})
    options = T2IOptions(guidance_scale=args.guidance_scale, generator_guidance_scale=args.generator_guidance_scale,
                         prompt_drop=args.prompt_drop, teacher_precision=args.teacher_precision,
                         compute_precision=args.compute_precision, trained_precision=args.trained_precision,
                         gradient_checkpointing=args.gradient_checkpointing)
    spec = _concepts(args)
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    if args.keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {args.keep_last}")
    check_writable_dir(args.out)  # refuse now, not after training
    check_replaceable(args.out / "generator", "--out", args.overwrite)
    if args.checkpoint_dir is not None:
        check_writable_dir(args.checkpoint_dir, "--checkpoint-dir")
    robust = RobustConfig(inner_steps=args.robust_inner_steps) if args.robust else None  # validated early

    def step_fn(state):
        if robust is not None:
            return robust_sfd_step(state, robust, options=args.step_options)
        return train_step(state, options=args.step_options)
    device = args.device
    if join_group:  # one rank per process
        device = distributed.init_from_env("gloo" if args.device == "cpu" else "nccl", one_rank_group=True)
    state = None
    try:
        main = distributed.is_main()
        torch.manual_seed(args.seed)
        state = build_t2i_state(load_t2i_pipeline(args.pipeline, device), spec, config, options, device)
        distributed.distribute_state(state, args.distributed)
        checkpoints = args.checkpoint_dir or (args.out / "checkpoints"
                                              if args.checkpoint_every or args.resume else None)
        bar = tqdm(total=args.steps, desc="sfd-t2i", disable=args.no_progress or not main)

        def on_log(step, metrics):  # every --log-every steps (one host sync there, none in between)
            bar.update(step - bar.n)
            bar.set_postfix(loss_gen=f"{metrics['loss_gen']:.4g}", loss_fake=f"{metrics['loss_fake']:.4g}")

        try:
            result = run_resilient(state, args.steps, checkpoint_root=checkpoints,
                                   checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
                                   resume=args.resume, log_every=args.log_every, on_log=on_log,
                                   step_fn=step_fn)
        except NonFiniteError as exc:
            print(f"sfd-fast distill: stopped: {exc}", file=sys.stderr)
            return 3
        finally:
            bar.close()
        ema = distributed.gathered_module(state, "generator_ema")  # collective under fsdp; None off rank 0
        if not main:
            return 0
        if result.report_start_and_stop():
            return EXIT_INTERRUPTED
        args.out.mkdir(parents=True, exist_ok=True)
        run_config = {"sfd": config.to_dict(), "t2i": vars(options), "step_options": args.step_options,
                      "robust": {"inner_steps": args.robust_inner_steps} if args.robust else None,
                      "world_size": distributed.world_size()}
        record = RunRecord(teacher=str(args.pipeline.resolve()), forget=spec.forget, override=spec.override,
                           remain=spec.remain, negative_prompt=spec.negative_prompt, config=run_config,
                           metrics={"training (last logged step)": result.log[-1]} if result.log else None,
                           extra={"distillation steps": args.steps})
        save_t2i_generator(ema, args.pipeline, args.out / "generator", spec.negative_prompt,
                           record=record, overwrite=args.overwrite)
        write_json({**run_config, "pipeline": str(args.pipeline.resolve()),
                    "forget": list(spec.forget), "override": list(spec.override), "remain": list(spec.remain),
                    "negative_prompt": spec.negative_prompt}, args.out / "config.json")
        write_json({"log": result.log}, args.out / "train_log.json")
        print(f"saved generator to {args.out / 'generator'}")
        return 0
    finally:
        distributed.shutdown(state)


def run_sample(args) -> int:
    """One-step samples of a generator folder: prompts for text-to-image, classes for class-label generators."""
    import torch

    from ..io.atomic import save_tensors
    from ..io.images import save_grid
    from ..models.networks import load_generator
    from ..train.text_to_image import is_t2i_generator, load_t2i_generator, sample_t2i_latents

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if not args.generator.is_dir():
        raise FileNotFoundError(f"generator folder {str(args.generator)!r} does not exist")
    text = is_t2i_generator(args.generator)  # otherwise a class-label generator (either folder layout)
    kind, flag, other = ("text-to-image", "--prompt", "--class") if text else ("class-label", "--class", "--prompt")
    rows, wrong = (args.prompt, args.classes) if text else (args.classes, args.prompt)
    if wrong:
        raise ValueError(f"{args.generator} is a {kind} generator: give {flag}, not {other}")
    if not rows:
        raise ValueError(f"give at least one {flag} for the {kind} generator in {args.generator}")
    if text:
        generator, pipeline = load_t2i_generator(args.generator, args.device)
        z, samples = sample_t2i_latents(generator, pipeline, [p for p in rows for _ in range(args.num)], args.seed)
        images = pipeline.decode(samples)
    else:
        generator = load_generator(args.generator, args.device)
        n_classes = generator.denoiser.num_classes
        bad = [c for c in rows if not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"--class {bad} out of range: this generator has classes 0..{n_classes - 1}")
        labels = torch.tensor([c for c in rows for _ in range(args.num)], device=args.device)
        rng = torch.Generator(device=args.device).manual_seed(args.seed)
        z = torch.randn((len(labels), *generator.denoiser.image_shape), generator=rng, device=args.device)
        with torch.no_grad():
            images = samples = generator(z, labels)
    save_grid(images, args.num, args.out)
    if args.save_tensors is not None:  # exact outputs, e.g. to compare with a stock diffusers pipeline
        save_tensors({"noise": z.float().cpu().contiguous(), "samples": samples.float().cpu().contiguous()},
                     args.save_tensors, {"rows": [str(r) for r in rows], "per_row": args.num, "seed": args.seed})
    print(f"wrote {args.out} ({len(rows)} {'prompts' if text else 'classes'} x {args.num} images, NFE 1)")
    return 0


def add_parsers(sub) -> None:
    """``sample`` and ``evaluate-t2i``; ``distill --pipeline`` has its own parser (see ``cli.main``)."""
    p = sub.add_parser("sample", help="one-step samples from a distilled generator, prompts or classes (PNG grid)",
                       description="Generate images with a generator folder: for each --prompt with a text-to-image "
                                   "generator (`sfd-fast distill --pipeline`; one network call, then the VAE decode), "
                                   "or for each --class with a class-label generator (`sfd-fast distill --teacher`).")
    p.add_argument("--generator", type=Path, required=True, help="generator folder (…/generator)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt (text-to-image generators); repeatable")
    p.add_argument("--class", dest="classes", action="append", type=int, default=[], metavar="N",
                   help="class label (class-label generators); repeatable")
    p.add_argument("--num", "--n", dest="num", type=int, default=4, help="images per prompt or class (default: 4)")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid, one row per prompt or class")
    p.add_argument("--save-tensors", type=Path, default=None, metavar="FILE",
                   help="also write the noise z and the raw samples (latents for prompts, images in [-1, 1] for "
                        "classes), in grid order, to a safetensors file")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; sampling shows no bar")
    p.set_defaults(handler=run_sample)

    p = sub.add_parser("evaluate-t2i", help="CLIP-scored forgetting metrics of a text-to-image run (JSON, grids)",
                       description="Score the generator of a `sfd-fast distill --pipeline` run and its teacher "
                                   "(Heun sampler) with a local CLIP model: override rate of forget prompts (closer "
                                   "to the override text than to the forget text), CLIP scores, and retention on "
                                   "remain prompts. Writes metrics.json and one sample grid per sampler.")
    p.add_argument("--run", type=Path, required=True, help="output folder of `distill --pipeline` (config.json, generator/)")
    p.add_argument("--clip", type=Path, required=True,
                   help="local transformers CLIPModel folder with its tokenizer (safetensors), e.g. a saved "
                        "openai/clip-vit-large-patch14")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and the PNG grids")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="the teacher's pipeline folder (default: the one recorded in the run's config.json)")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt and sampler (default: 4)")
    p.add_argument("--teacher-steps", type=int, default=25,
                   help="Heun steps of the teacher sampler; NFE = 2*steps-1 (default: 25)")
    p.add_argument("--max-forget", type=int, default=8, help="score at most this many forget prompts (default: 8)")
    p.add_argument("--max-remain", type=int, default=8, help="score at most this many remain prompts (default: 8)")
    p.add_argument("--batch-size", type=int, default=16, help="images per network call (default: 16)")
    p.add_argument("--attack-steps", type=int, default=30,
                   help="Adam steps of the soft-prompt attack on each scored forget prompt; 0 skips it (default: 30)")
    p.add_argument("--attack-tokens", type=int, default=4, help="learned soft tokens per attacked prompt (default: 4)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, shared by both samplers (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the attack's progress bar")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    from ..eval.clip_eval import ClipJudge, evaluate_t2i
    from ..eval.prompt_attack import soft_prompt_attack
    from ..io.atomic import write_json
    from ..io.images import save_grid
    from ..models.latent_denoiser import LatentDenoiser
    from ..models.sd_pipeline import load_t2i_pipeline
    from ..train.text_to_image import load_t2i_generator

    if args.attack_steps < 0:
        raise ValueError(f"--attack-steps must be >= 0, got {args.attack_steps}")
    for name in ("per_prompt", "teacher_steps", "max_forget", "max_remain", "batch_size", "attack_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config_file = args.run / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(config_file)!r} not found: --run must be the --out folder of "
                                "`sfd-fast distill --pipeline`")
    run = json.loads(config_file.read_text())
    pipeline_dir = args.pipeline or Path(run["pipeline"])
    judge = ClipJudge(args.clip, args.device)
    generator, _ = load_t2i_generator(args.run / "generator", args.device)
    pipeline = load_t2i_pipeline(pipeline_dir, args.device)
    if pipeline.kind != "sd":  # the soft-prompt attack hooks one CLIP text encoder; the Heun sampler a DDPM table
        raise ValueError(f"evaluate-t2i supports StableDiffusionPipeline runs only; {pipeline_dir} is a "
                         f"{pipeline.pipeline_class} folder (sample it with `sfd-fast sample` or stock diffusers)")
    guidance = run["t2i"]["guidance_scale"]
    negative = pipeline.encode_prompts([run["negative_prompt"]]) if guidance != 1 else None
    teacher = LatentDenoiser(pipeline.unet, pipeline.scheduler_config, guidance, negative).to(args.device)
    forget, override = run["forget"][:args.max_forget], run["override"][:args.max_forget]
    remain = run["remain"][:args.max_remain]
    torch.manual_seed(args.seed)
    metrics, images = evaluate_t2i(generator, teacher, pipeline, judge, forget, override, remain,
                                   per_prompt=args.per_prompt, teacher_steps=args.teacher_steps, seed=args.seed,
                                   batch_size=args.batch_size)
    if args.attack_steps > 0:  # AdvUnlearn-style soft-prompt attack on the generator, ASR by the CLIP judge
        attacks = [soft_prompt_attack(generator, teacher, pipeline, judge, f, o, tokens=args.attack_tokens,
                                      steps=args.attack_steps, teacher_steps=args.teacher_steps, seed=args.seed)
                   for f, o in tqdm(list(zip(forget, override)), desc="attack", disable=args.no_progress)]
        metrics["attack"] = {"asr_before": sum(a["asr_before"] for a in attacks) / len(attacks),
                             "asr_after": sum(a["asr_after"] for a in attacks) / len(attacks),
                             "per_prompt": attacks}
    metrics.update(run=str(args.run), pipeline=str(pipeline_dir), forget=forget, override=override, remain=remain)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, imgs in images.items():
        save_grid(imgs, args.per_prompt, args.out / f"samples_{name}.png")  # forget rows, then remain rows
    write_json(metrics, args.out / "metrics.json")
    for name in ("generator", "teacher"):
        m = metrics[name]
        print(f"{name:9s} (NFE {metrics['nfe'][name]:>2}): override_rate={m['override_rate']:.3f} "
              f"forget_clip={m['forget_clip_score']:.2f} override_clip={m['override_clip_score']:.2f} "
              f"remain_clip={m['remain_clip_score']:.2f}")
    print(f"retention (CLIP image distance to the teacher, remain prompts): {metrics['retention_clip_distance']:.4f}")
    if "attack" in metrics:
        print(f"soft-prompt attack on the generator: ASR {metrics['attack']['asr_before']:.3f} before, "
              f"{metrics['attack']['asr_after']:.3f} after")
    print(f"wrote {args.out / 'metrics.json'}, samples_generator.png, samples_teacher.png")
    return 0


__all__ = ["build_distill_parser", "run_distill", "add_parsers", "run_sample", "run_evaluate", "DEFAULT_REMAIN"]

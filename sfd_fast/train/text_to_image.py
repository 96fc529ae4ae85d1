"""SFD on a latent text-to-image model: build the state, run the shared ``train_step``, save/load G.

The three networks are denoisers over copies of the pipeline's network: ``LatentDenoiser`` (SD1.x UNet),
``SDXLDenoiser`` (SDXL UNet), ``PixArtDenoiser`` (PixArt DiT) or ``FlowDenoiser`` (SD3 flow transformer);
the pipeline object decides, through ``make_denoiser`` / ``make_generator`` (docs/backbones.md). The teacher and the fake
score evaluate with CFG (scale ``guidance_scale``, negative prompt = ConceptSpec.negative_prompt),
the generator G(z, text) = D(sigma_init z, sigma_init, text) with its own (default: no) guidance.
One CFG scale per network: the fake score trains and evaluates with the same scale (SiD-LSG's
kappa_train_fake = kappa_eval_fake). VAE and text encoder are never trained; latents are decoded
only for samples.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import SFDConfig
from ..core.master_weights import use_master_weights
from ..core.prompts import ConceptSpec, PromptConditions
from ..core.state import SFDState
from ..io.atomic import CheckpointError, replace_dir
from ..models.flow_denoiser import FlowDenoiser, FlowOneStepGenerator, one_step_flow_scheduler
from ..models.model_card import ModelCard, RunRecord
from ..models.networks import OneStepGenerator
from ..models.sd_pipeline import T2IPipeline, load_t2i_pipeline

GENERATOR_META = "sfd_fast.json"
T2I_GENERATOR_ROLE = "t2i_one_step_generator"  # the sidecar's "role" (class generators share the file name)

# SPEC section 3, text-to-image run: alpha 1, lambda_sg = lambda_g = 1, batch 8, lr_G 1e-6, lr_psi 3e-6.
T2I_SFD_CONFIG = SFDConfig(alpha=1.0, lambda_sg=1.0, lambda_g=1.0, batch_size=4, forget_batch_size=4,
                           lr_gen=1e-6, lr_fake=3e-6)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class T2IOptions:
    """Text-to-image specifics of one run (everything else is in SFDConfig)."""

    guidance_scale: float = 4.5            # CFG scale of teacher and fake score (SPEC section 3)
    generator_guidance_scale: float = 1.0  # CFG of G itself; 1 = one UNet call per sample
    prompt_drop: float = 0.1               # share of fake-score training prompts dropped to ""
    teacher_precision: str = "fp32"        # "bf16": frozen teacher weights stored in bf16 (half the memory)
    compute_precision: str = "fp32"        # "bf16": autocast of fake score and G (weights stay as stored)
    trained_precision: str = "fp32"        # "bf16": fake score and G weights stored in bf16, Adam on fp32 masters
    gradient_checkpointing: bool = False   # recompute UNet activations of G, teacher and fake score in backward

    def __post_init__(self) -> None:
        for name in ("teacher_precision", "compute_precision", "trained_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; choose one of {PRECISIONS}")
        if self.guidance_scale < 1 or self.generator_guidance_scale < 1:
            raise ValueError(f"guidance scales must be >= 1, got guidance_scale={self.guidance_scale}, "
                             f"generator_guidance_scale={self.generator_guidance_scale}")


def build_t2i_state(pipeline: T2IPipeline, spec: ConceptSpec, config: SFDConfig = T2I_SFD_CONFIG,
                    options: T2IOptions = T2IOptions(), device: str | torch.device | None = None) -> SFDState:
    """SFDState whose three networks are denoisers over ``pipeline.network`` and copies of it.

    ``pipeline`` is what ``load_t2i_pipeline`` returns: ``T2IPipeline`` (SD1.x), ``SDXLT2IPipeline``,
    ``PixArtT2IPipeline`` or ``SD3T2IPipeline`` (flow transformer; G is then a ``FlowOneStepGenerator``,
    x_t = z at t_init). The teacher *is* ``pipeline.network`` (no extra copy at
    SD size): the state takes it over, and the memory options below change it in place; load the pipeline
    again for another state.
    """
    device = torch.device(device) if device is not None else pipeline.device
    conditions = PromptConditions.encode(spec, pipeline, options.prompt_drop).to(device)
    teacher = pipeline.make_denoiser(options.guidance_scale, conditions.negative)
    state = SFDState.create(config, teacher, device, conditions=conditions)
    generator = pipeline.make_generator(state.generator.denoiser, config.sigma_init)
    if type(generator) is not type(state.generator):  # same denoiser (and parameters), other input convention
        state.generator = generator.train()
        state.generator_ema = pipeline.make_generator(state.generator_ema.denoiser, config.sigma_init).eval()
    bf16 = torch.bfloat16
    if options.teacher_precision == "bf16":
        state.teacher.network.to(bf16)  # frozen and optimizer-free: no fp32 copy is needed
    if options.trained_precision == "bf16":
        # Network weights only: the denoisers' sigma tables (buffers) stay fp32. The EMA stays fp32
        # and averages the masters.
        state.opt_fake = use_master_weights(state.fake.network, state.opt_fake, bf16)
        state.opt_gen = use_master_weights(state.generator.denoiser.network, state.opt_gen, bf16)
    for net in (state.fake, state.generator.denoiser):
        net.compute_dtype = bf16 if options.compute_precision == "bf16" else None
    if options.gradient_checkpointing:
        for net in (state.generator.denoiser, state.teacher, state.fake):
            net.network.enable_gradient_checkpointing()
    for g in (state.generator.denoiser, state.generator_ema.denoiser):
        g.set_guidance(options.generator_guidance_scale)
    return state


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")  # never copied into a generator folder


def save_t2i_generator(generator: OneStepGenerator, pipeline_dir: str | os.PathLike, out: str | os.PathLike,
                       negative_prompt: str = "", record: RunRecord | None = None, overwrite: bool = False) -> Path:
    """G as a complete diffusers pipeline folder of the teacher's class that stock diffusers samples in one step.

    An existing ``out`` is replaced only if sfd_fast wrote it (or it is empty), unless ``overwrite``.

    For SD3 (``FlowDenoiser``) the network goes to ``transformer/`` and the scheduler is
    ``one_step_flow_scheduler`` (called with ``sigmas=[t_init]``); PixArt's network also goes to ``transformer/``.

    ``unet/`` is G's; ``scheduler/`` is the one-step EulerDiscreteScheduler (``one_step_euler_scheduler``:
    one step = [sigma_init, 0]); every other component of the teacher's ``model_index.json`` (VAE, text
    encoder, tokenizer, ...) is copied (safetensors only). ``README.md`` is the model card (``record``
    adds teacher, concepts, config and metrics); ``sfd_fast.json`` keeps G's sigma_init, CFG scale and
    negative prompt for ``load_t2i_generator``. ``one_step_call_kwargs(out)`` is the call that reproduces G.
    """
    from ..models.one_step_pipeline import one_step_euler_scheduler

    pipeline_dir, out = Path(pipeline_dir), Path(out)
    denoiser = generator.denoiser
    network_name = denoiser.network_subfolder  # unet/ (SD1.x) or transformer/ (SD3, PixArt)
    if isinstance(denoiser, FlowDenoiser):
        if not isinstance(generator, FlowOneStepGenerator):
            raise TypeError("a flow-matching generator must be a FlowOneStepGenerator (x_t = z at t_init)")
        scheduler = one_step_flow_scheduler(denoiser.scheduler_config)
        call_kwargs = {"sigmas": [generator.t_init], **_sd3_call_kwargs(pipeline_dir)}
    else:
        scheduler = one_step_euler_scheduler(denoiser.scheduler_config, generator.sigma_init)
        call_kwargs = denoiser.stock_call_kwargs()
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, entry in index.items():
            copied = (not name.startswith("_") and name not in (network_name, "scheduler") and isinstance(entry, list)
                      and entry and entry[0] is not None)
            if copied and (pipeline_dir / name).is_dir():
                shutil.copytree(pipeline_dir / name, tmp / name, ignore=shutil.ignore_patterns(*PICKLED_WEIGHTS))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        denoiser.network.save_pretrained(tmp / network_name, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        meta = {"role": T2I_GENERATOR_ROLE, "sigma_init": generator.sigma_init,
                "guidance_scale": denoiser.guidance_scale, "negative_prompt": negative_prompt}
        if call_kwargs:
            meta["call_kwargs"] = call_kwargs
        (tmp / GENERATOR_META).write_text(json.dumps(meta, indent=2))
        _t2i_card(generator, index, meta, record or RunRecord(teacher=str(pipeline_dir))).write(tmp)
        replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _sd3_call_kwargs(pipeline_dir: Path) -> dict:
    """``max_sequence_length`` the SD3 prompts were encoded with (``load_sd3_pipeline``'s rule), read from the
    folder's T5 tokenizer config (the default when there is none or it is unreadable)."""
    from ..models.sd3_pipeline import t5_sequence_length

    try:
        config = json.loads((pipeline_dir / "tokenizer_3" / "tokenizer_config.json").read_text())
        return {"max_sequence_length": t5_sequence_length(config["model_max_length"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"max_sequence_length": t5_sequence_length(None)}


def _call_kwargs(meta: dict) -> dict:
    kwargs = {"num_inference_steps": 1, "guidance_scale": float(meta["guidance_scale"]), **meta.get("call_kwargs", {})}
    if meta["guidance_scale"] != 1 and meta.get("negative_prompt"):
        kwargs["negative_prompt"] = meta["negative_prompt"]
    return kwargs


def one_step_call_kwargs(path: str | os.PathLike) -> dict:
    """Keyword arguments of ``StableDiffusionPipeline.__call__`` that make the folder at ``path`` sample G:
    ``num_inference_steps=1``, G's own ``guidance_scale`` (1.0 unless distilled with a generator CFG) and,
    with CFG, its ``negative_prompt`` (a string: with a list of prompts diffusers wants a list of the same length)."""
    meta = _generator_meta(path)
    if meta.get("role") != T2I_GENERATOR_ROLE:
        raise CheckpointError(f"{str(path)!r} is not a text-to-image one-step generator folder")
    return _call_kwargs(meta)


def _t2i_card(generator: OneStepGenerator, index: dict, meta: dict, record: RunRecord) -> ModelCard:
    denoiser = generator.denoiser
    pipeline_class = index.get("_class_name", "StableDiffusionPipeline")
    args = ", ".join(f"{k}={v!r}" for k, v in _call_kwargs(meta).items())
    usage = (f"from diffusers import {pipeline_class}\n\n"
             f"pipe = {pipeline_class}.from_pretrained(\"path/to/generator\")\n"
             f"image = pipe(\"a photo of a cat\", {args}).images[0]\n")
    flow = isinstance(denoiser, FlowDenoiser)
    t_init = float(denoiser.timestep(torch.tensor([generator.sigma_init], device=next(denoiser.parameters()).device)))
    net = "UNet" if denoiser.network_subfolder == "unet" else "transformer"
    guidance = (f"no classifier-free guidance: the teacher's CFG was distilled into G, one {net} call per image"
                if meta["guidance_scale"] == 1 else
                f"CFG {meta['guidance_scale']} with negative prompt {meta['negative_prompt']!r} (two {net} calls)")
    if flow:
        how = (f"its scheduler is a `FlowMatchEulerDiscreteScheduler` with shift 1, so one step with "
               f"`sigmas=[{generator.t_init!r}]` runs exactly [t_init, 0] from unit noise and reproduces G")
        scheduler_fact = "FlowMatchEulerDiscreteScheduler, shift 1, called with sigmas=[t_init]"
        timing = {"t_init (flow time; model timestep x 1000)": round(generator.t_init, 6)}
    else:
        how = ("its scheduler is an `EulerDiscreteScheduler` with Karras sigmas capped at sigma_init, so "
               "`num_inference_steps=1` runs exactly [sigma_init, 0] and reproduces G")
        scheduler_fact = "EulerDiscreteScheduler, use_karras_sigmas, sigma_max = sigma_init"
        timing = {"t_init (fractional training timestep)": round(t_init, 4)}
    return ModelCard(
        title="One-step text-to-image generator (Score Forgetting Distillation)", pipeline_tag="text-to-image",
        summary=("A one-step generator G(z, text) = D(sigma_init z, sigma_init, text) distilled from the teacher "
                 "pipeline below by SFD, which also makes it forget the concepts listed. This folder is a complete "
                 f"diffusers `{pipeline_class}`: {how}. "
                 f"Pass `guidance_scale={meta['guidance_scale']}` (the pipeline's default 7.5 would add CFG that "
                 "G was not distilled with) and one step (more steps run G at noise levels it was not trained for)."),
        usage=((f"With diffusers alone (`{pipeline_class}`, nothing of sfd_fast is imported):", usage),),
        facts={"pipeline": pipeline_class, "prediction type": denoiser.prediction_type,
               "sigma_init": generator.sigma_init, **timing, "scheduler": scheduler_fact,
               "steps (NFE)": 1, "guidance": guidance},
        record=record)


def _generator_meta(path: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(path) / GENERATOR_META).read_text())
    except (OSError, ValueError):
        return {}


def is_t2i_generator(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``save_t2i_generator``."""
    return _generator_meta(path).get("role") == T2I_GENERATOR_ROLE


def load_t2i_generator(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(G, its pipeline) from a ``save_t2i_generator`` folder: a OneStepGenerator over a LatentDenoiser and a
    T2IPipeline, or (SD3) a FlowOneStepGenerator over a FlowDenoiser and an SD3T2IPipeline."""
    meta = _generator_meta(path)
    if meta.get("role") != T2I_GENERATOR_ROLE:
        raise CheckpointError(f"{str(path)!r} is not a text-to-image one-step generator folder (written by "
                              "`sfd-fast distill --pipeline`)")
    pipeline = load_t2i_pipeline(path, device)
    negative = pipeline.encode_prompts([meta["negative_prompt"]]) if meta["guidance_scale"] != 1 else None
    denoiser = pipeline.make_denoiser(meta["guidance_scale"], negative)
    return pipeline.make_generator(denoiser, meta["sigma_init"]).to(device).eval(), pipeline


@torch.no_grad()
def sample_t2i_latents(generator: OneStepGenerator, pipeline: T2IPipeline, prompts: list[str],
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, latents): the unit noise (N, 4, h, w) drawn from ``seed`` and G's latents for it (one call)."""
    device = next(generator.parameters()).device
    emb = pipeline.encode_prompts(prompts).to(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((len(prompts), *generator.denoiser.image_shape), generator=rng, device=device)
    return z, generator(z, emb)


@torch.no_grad()
def sample_t2i(generator: OneStepGenerator, pipeline: T2IPipeline, prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1]: one generator call per prompt batch, then the VAE decode."""
    return pipeline.decode(sample_t2i_latents(generator, pipeline, prompts, seed)[1])


__all__ = ["T2IOptions", "T2I_SFD_CONFIG", "build_t2i_state", "save_t2i_generator", "load_t2i_generator",
           "is_t2i_generator", "one_step_call_kwargs", "sample_t2i", "sample_t2i_latents"]

"""Text-to-image (latent) train-step throughput: reference vs fast path, one run.

    python -m pytest bench/bench_t2i_step.py --benchmark-enable \
        --benchmark-json=bench/results/t2i_step-<device>-<date>.json

Model: the random SD-style pipeline of ``sfd_fast.models.tiny_sd`` ("mid": 16x16x4 latents, 3-level
UNet2DConditionModel with cross-attention, CLIP text encoder with L=16, D=64), or an SD-size
folder given in $SFD_FAST_T2I_PIPELINE. Teacher and fake score run CFG (scale 4.5: cond + uncond
in one UNet call); batch 4 + 4.

Providers, each (T2IOptions, train_step options):
  reference_fp32             fp32 weights and compute, reference eager step (core/step.py)
  fused_fp32                 the fast path (core/fast_step.py), fp32: same numbers as the reference
  fused_bf16_autocast        fast path with bf16 autocast; teacher weights bf16
  fused_bf16_weights         fast path; teacher bf16, fake score and G stored in bf16 with fp32 masters
  fused_bf16_weights_ckpt    as fused_bf16_weights plus gradient checkpointing of all three UNets
  fast                       bf16 weights + the "fast" preset (shared G sample, channels_last,
                             compile and CUDA graphs where the device allows; compile off on CPU)
Reported in ``extra_info``: images/s, steps/s, ratio to reference_fp32 measured in this run, UNet
forward FLOPs (one CFG-less call over the batch), the step's FLOPs from the per-provider model of
bench/_flops.py (teacher and fake score at 2x batch for CFG, G at 1x; the G sample reused on the
fast path with share_noise; forwards recomputed under gradient checkpointing) next to a
FlopCounterMode count of one eager-equivalent step, achieved model FLOP/s and, on GPU, MFU
(model FLOPs, no recompute) and HFU (counted FLOPs, recompute included) against the dense bf16
peak; ``saved_for_backward_bytes`` (distinct tensors autograd kept
for backward during one whole step, weights excluded: the activation memory, measurable on CPU),
``state_bytes`` (weights of the four networks + optimizer state incl. master copies), and on CUDA
the peak allocated memory.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import _flops
import _timing
from sfd_fast import train_step
from sfd_fast.core.prompts import ConceptSpec
from sfd_fast.core.step_options import StepOptions
from sfd_fast.models.networks import count_parameters
from sfd_fast.models.sd_pipeline import load_t2i_pipeline
from sfd_fast.models.tiny_sd import build_tiny_pipeline
from sfd_fast.train.text_to_image import T2I_SFD_CONFIG, T2IOptions, build_t2i_state

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra")

BF16_WEIGHTS = T2IOptions(teacher_precision="bf16", trained_precision="bf16")
PROVIDERS = {
    "reference_fp32": (T2IOptions(), None),
    "fused_fp32": (T2IOptions(), "fused"),
    "fused_bf16_autocast": (T2IOptions(teacher_precision="bf16"), "bf16"),
    "fused_bf16_weights": (BF16_WEIGHTS, "fused"),
    "fused_bf16_weights_ckpt": (T2IOptions(teacher_precision="bf16", trained_precision="bf16",
                                           gradient_checkpointing=True), "fused"),
    "fast": (BF16_WEIGHTS, "fast"),
}
# timed rounds; the untimed memory-measuring step is the warm-up. SFD_BENCH_QUICK=1: fewer, and
# "fast" with compile off on GPU too (bench/gpu_check.sh budget).
ROUNDS = {"cpu": 2, "cuda": 3} if _timing.quick() else {"cpu": 5, "cuda": 10}
CONFIG = T2I_SFD_CONFIG.replace(batch_size=4, forget_batch_size=4)
SPEC = ConceptSpec.from_substitution("brad pitt", "a middle aged man",
                                     ["a photo of a cat", "a red car", "a bowl of fruit"])
_MEDIANS: dict[str, float] = {}


def step_options(name: str | None, device: torch.device) -> StepOptions | None:
    if name is None:
        return None
    options = StepOptions.from_name(name)
    if (device.type != "cuda" or _timing.quick()) and options.compile != "off":
        options = options.replace(compile="off")  # inductor on a 2-core CPU takes minutes per UNet
    return options


def cfg_calls(scale: float) -> int:
    """UNet batch multiplier of a denoiser with CFG scale ``scale``: cond + uncond in one call when != 1."""
    return 1 if scale == 1 else 2


def state_bytes(state) -> int:
    """Weights of teacher, fake score, G and its EMA, plus every optimizer tensor (masters included)."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    total = sum(size(m.parameters()) for m in (state.teacher, state.fake, state.generator, state.generator_ema))
    for opt in (state.opt_fake, state.opt_gen):
        total += size(getattr(opt, "master_params", []))
        total += size(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return total


def saved_for_backward_bytes(state, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, weights excluded.

    The storages are held until ``fn`` returns, so no address is reused and each counts once.
    """
    weights = {p.untyped_storage().data_ptr() for m in (state.teacher, state.fake, state.generator)
               for p in m.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in saved.values())


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    supplied = os.environ.get("SFD_FAST_T2I_PIPELINE")
    return supplied or build_tiny_pipeline(tmp_path_factory.mktemp("t2i") / "mid", shape="mid")


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_t2i_train_step(benchmark, pipeline_dir, bench_device, provider):
    t2i_options, preset = PROVIDERS[provider]
    options = step_options(preset, bench_device)

    def make_state():
        torch.manual_seed(0)
        pipe = load_t2i_pipeline(pipeline_dir, bench_device)  # fresh: the state takes the UNet over
        return pipe, build_t2i_state(pipe, SPEC, CONFIG, t2i_options, bench_device)

    counted = _flops.counted_step_flops(lambda: make_state()[1], options, train_step)
    gc.collect()
    pipe, state = make_state()
    n = CONFIG.batch_size + CONFIG.forget_batch_size
    x = torch.randn(n, *state.image_shape, device=bench_device)
    emb = state.forget.remain[:1].expand(n, -1, -1)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        state.teacher.unet(x.to(state.teacher.unet.dtype), torch.full((n,), 500, device=bench_device),
                           encoder_hidden_states=emb.to(state.teacher.unet.dtype))
    cuda = bench_device.type == "cuda"

    def step():
        metrics = train_step(state, options=options)
        if cuda:
            torch.cuda.synchronize()
        return metrics

    model = _flops.step_flops(fwd.get_total_flops(), options, cfg_teacher=cfg_calls(t2i_options.guidance_scale),
                              cfg_fake=cfg_calls(t2i_options.guidance_scale),
                              cfg_generator=cfg_calls(t2i_options.generator_guidance_scale),
                              recompute=t2i_options.gradient_checkpointing)
    _timing.peak_memory_reset(bench_device)
    warmup = 0
    if options is not None and options.cuda_graph != "off" and cuda:
        warmup = options.warmup_steps + 1  # capture happens outside the timed rounds
    if options is None or options.compile == "off":
        saved_bytes = saved_for_backward_bytes(state, step)  # also the first (warm-up) step
    else:  # hooks around compiled regions may not be traced; CUDA peak memory covers it
        step()
        saved_bytes = None
    metrics = benchmark.pedantic(step, rounds=ROUNDS[bench_device.type], iterations=1, warmup_rounds=warmup)
    assert all(torch.isfinite(v.float()) for v in metrics.values())
    info = benchmark.extra_info
    info.update(provider=provider, t2i_options=vars(t2i_options),
                step_options=None if options is None else options.to_dict(),
                unet_params=count_parameters(pipe.unet), batch_images=n, cfg_scale=t2i_options.guidance_scale,
                unet_forward_flops=fwd.get_total_flops(), pipeline=str(pipeline_dir),
                saved_for_backward_bytes=saved_bytes, state_bytes=state_bytes(state),
                step_flops_model=model["total"], step_flops_model_passes=model["passes"],
                step_units_of_forward=model["units_of_forward"], step_flops_counted=counted,
                flop_model_over_counted=model["total_with_recompute"] / counted if counted else None,
                peak_flops=_flops.peak_flops(bench_device))
    if cuda:
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    median = stats.stats.median
    _MEDIANS[provider] = median
    info["steps_per_s"] = 1.0 / median
    info["images_per_s"] = n / median
    info["achieved_flops_per_s"] = model["total"] / median
    info["mfu"] = model["total"] / median / info["peak_flops"] if info["peak_flops"] else None
    info["hfu"] = counted / median / info["peak_flops"] if info["peak_flops"] and counted else None
    if "reference_fp32" in _MEDIANS:
        info["speedup_vs_reference"] = _MEDIANS["reference_fp32"] / median


def test_t2i_train_step_interleaved(benchmark, pipeline_dir, bench_device):
    """The providers' steps round-robin in one process (``_timing.interleaved``): the ratios to
    quote. One benchmark round = one step of each; ``extra_info.interleaved`` holds each
    provider's median, IQR and ratio to the reference over the rounds."""
    names = ["reference_fp32", "fused_fp32", "fused_bf16_weights"]
    states, options = {}, {}
    for name in names:
        t2i_options, preset = PROVIDERS[name]
        torch.manual_seed(0)
        pipe = load_t2i_pipeline(pipeline_dir, bench_device)
        states[name] = build_t2i_state(pipe, SPEC, CONFIG, t2i_options, bench_device)
        options[name] = step_options(preset, bench_device)
    calls = {name: (lambda n=name: train_step(states[n], options=options[n])) for name in names}
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else None
    result = _timing.interleaved(calls, rounds=5 if _timing.quick() else 11, warmup=1, sync=sync)
    benchmark.pedantic(lambda: [c() for c in calls.values()], rounds=1, iterations=1)
    benchmark.extra_info.update(interleaved=result, torch_threads=torch.get_num_threads(),
                                batch_images=CONFIG.batch_size + CONFIG.forget_batch_size, pipeline=str(pipeline_dir))
    _timing.print_interleaved("text-to-image train_step (mid pipeline, CFG 4.5)", result, torch.get_num_threads())

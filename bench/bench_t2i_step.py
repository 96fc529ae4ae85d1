"""Text-to-image (latent) train-step throughput: providers side by side in one run.

    python -m pytest bench/bench_t2i_step.py --benchmark-enable \
        --benchmark-json=bench/results/t2i_step-<device>-<date>.json

Model: the random SD-style pipeline of ``sfd_fast.t2i_tiny`` ("mid": 16x16x4 latents, 3-level
UNet2DConditionModel with cross-attention, CLIP text encoder with L=16, D=64) on CPU; the same
pipeline shape is used on GPU until an SD-size folder is supplied via $SFD_FAST_T2I_PIPELINE.
Teacher and fake score run CFG (scale 4.5: cond + uncond in one UNet call); batch 4 + 4.

Providers (each a function state-options -> T2IOptions / StepOptions; the fused path of
``fast_step`` is one more entry once it accepts text conditions):
  reference_fp32       fp32 weights and compute
  bf16_autocast        fake score and G autocast to bf16 (fp32 master weights), teacher weights bf16
  bf16_checkpointing   as bf16_autocast plus gradient checkpointing of G and teacher (memory, not speed)
Reported in ``extra_info``: images/s, steps/s, ratio to reference_fp32 measured in this run,
UNet forward FLOPs (FlopCounterMode, one CFG-less call), peak memory (CUDA) or process peak RSS (CPU).
"""

from __future__ import annotations

import os
import resource

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sfd_fast import train_step
from sfd_fast.networks import count_parameters
from sfd_fast.t2i_concepts import ConceptSpec
from sfd_fast.t2i_distill import T2I_SFD_CONFIG, T2IOptions, build_t2i_state
from sfd_fast.t2i_pipeline import load_t2i_pipeline
from sfd_fast.t2i_tiny import build_tiny_pipeline

pytest.importorskip("transformers", reason="text-to-image needs the 'text' extra")

PROVIDERS = {
    "reference_fp32": T2IOptions(),
    "bf16_autocast": T2IOptions(teacher_precision="bf16", compute_precision="bf16"),
    "bf16_checkpointing": T2IOptions(teacher_precision="bf16", compute_precision="bf16", gradient_checkpointing=True),
}
ROUNDS = {"cpu": (1, 2), "cuda": (3, 10)}  # (warmup, timed)
CONFIG = T2I_SFD_CONFIG.replace(batch_size=4, forget_batch_size=4)
SPEC = ConceptSpec.from_substitution("brad pitt", "a middle aged man",
                                     ["a photo of a cat", "a red car", "a bowl of fruit"])
_MEDIANS: dict[str, float] = {}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    supplied = os.environ.get("SFD_FAST_T2I_PIPELINE")
    return supplied or build_tiny_pipeline(tmp_path_factory.mktemp("t2i") / "mid", shape="mid")


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_t2i_train_step(benchmark, pipeline_dir, bench_device, provider):
    pipe = load_t2i_pipeline(pipeline_dir, bench_device)  # fresh: the state takes the UNet over
    state = build_t2i_state(pipe, SPEC, CONFIG, PROVIDERS[provider], bench_device)
    n = CONFIG.batch_size + CONFIG.forget_batch_size
    x = torch.randn(n, *state.image_shape, device=bench_device)
    emb = state.forget.remain[:1].expand(n, -1, -1)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        state.generator.denoiser(x, torch.ones(n, device=bench_device), emb)
    cuda = bench_device.type == "cuda"

    def step():
        metrics = train_step(state)
        if cuda:
            torch.cuda.synchronize()
        return metrics

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS[bench_device.type]
    metrics = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    assert all(torch.isfinite(v.float()) for v in metrics.values())
    info = benchmark.extra_info
    info.update(provider=provider, options=vars(PROVIDERS[provider]), unet_params=count_parameters(pipe.unet),
                batch_images=n, cfg_scale=PROVIDERS[provider].guidance_scale,
                unet_forward_flops=fwd.get_total_flops(), pipeline=str(pipeline_dir))
    if cuda:
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        info["peak_rss_bytes_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    median = stats.stats.median
    _MEDIANS[provider] = median
    info["steps_per_s"] = 1.0 / median
    info["images_per_s"] = n / median
    if "reference_fp32" in _MEDIANS:
        info["speedup_vs_reference"] = _MEDIANS["reference_fp32"] / median

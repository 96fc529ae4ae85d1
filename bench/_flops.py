"""FLOP model of one SFD training step, per provider (SPEC section 6), for MFU in the train-step suites.

Unit: F = the FLOPs of one UNet forward over the step's whole batch (remain + forget rows,
one condition per row), measured with torch.utils.flop_counter.FlopCounterMode. Matrix FLOPs
only (convolutions, linears, attention), which is what FlopCounterMode counts and what a
tensor-core peak bounds.

Cost of the passes, as fractions of F: a forward 1; a full backward (weight and input
gradients) 2; an input-only backward 1 (the weights are frozen, so autograd prunes the
weight-gradient GEMMs; attention, which has no weights, costs 2x its forward either way, so the
counted value is a little above 1 for networks with attention). CFG (classifier-free guidance
with cond + uncond in one call) doubles the batch of that network's calls; gradient
checkpointing recomputes each checkpointed forward once inside its backward.

``step_flops`` is the model; the suites also count one eager step of each provider with
FlopCounterMode (``counted_step_flops``) and store both, so a drift of the model from the code
shows up as a ratio away from 1.
"""

from __future__ import annotations

from typing import Callable

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s.
# Checked in this order ("H100 PCIe" and "H100 NVL" before "H100"; "GH200" matches "H200": same 989).
DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835.5e12, "H100": 989.4e12, "H200": 989.4e12,
                   "A100": 312e12}
FULL_BACKWARD = 2.0   # weight + input gradients, x forward
INPUT_BACKWARD = 1.0  # input gradients only (frozen weights), x forward


def peak_flops(device) -> float | None:
    """Dense bf16 tensor-core peak of a CUDA ``device`` (FLOP/s), None on CPU or an unlisted GPU."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DENSE_BF16_PEAK.items():
        if key in name:
            return value
    return None


def reuses_generator_sample(options) -> bool:
    """True when the step evaluates G once per iteration instead of twice.

    sfd_fast/core/fast_step.py ``_step_body``: ``reuse = share_noise and reuse_generator_sample
    and one micro-batch``; only on the fused path (the reference step.py always runs G twice,
    also with share_noise).
    """
    return (options is not None and options.fused and options.share_noise and options.reuse_generator_sample
            and options.accumulation_rounds == 1)


def step_passes(options, *, cfg_teacher: int = 1, cfg_fake: int = 1, cfg_generator: int = 1,
                recompute: bool = False) -> dict[str, float]:
    """The UNet passes of one SFD iteration, {pass name: cost in units of F}.

    ``options``: the StepOptions of the provider (None = the reference step). ``cfg_*``: 2 for
    a network called with CFG (cond + uncond batched), else 1. ``recompute``: gradient
    checkpointing of G, teacher and fake score.

    Fake-score step (update psi on detached generator samples):
      G fwd, no grad ................ cfg_generator       (0 when the G sample is reused)
      psi fwd ....................... cfg_fake
      psi bwd, weights + inputs ..... 2 cfg_fake          (+ cfg_fake recomputed with checkpointing)
    Generator step (update theta through the frozen teacher and fake score):
      G fwd ......................... cfg_generator
      G bwd, weights + inputs ....... 2 cfg_generator     (+ cfg_generator recomputed)
      teacher fwd ................... cfg_teacher
      teacher input-only bwd ........ cfg_teacher         (+ cfg_teacher recomputed)
      fake fwd ...................... cfg_fake
      fake input-only bwd ........... cfg_fake            (+ cfg_fake recomputed)
    Without CFG: 11 F for the reference step, 10 F with the G sample reused (share_noise on the
    fused path); SPEC section 6 puts one iteration at ~11-13 F.
    Recompute passes are named "recompute: ..." (HFU only, not MFU).
    Gradient accumulation splits the batch into micro-batches with the same total (and turns
    the reuse off); bf16, channels_last, torch.compile and CUDA graphs change no FLOP count.
    """
    g, t, f = cfg_generator, cfg_teacher, cfg_fake
    passes = {
        "fake step: G fwd (no grad)": 0.0 if reuses_generator_sample(options) else g,
        "fake step: psi fwd": f,
        "fake step: psi bwd (weights + inputs)": FULL_BACKWARD * f,
        "gen step: G fwd": g,
        "gen step: G bwd (weights + inputs)": FULL_BACKWARD * g,
        "gen step: teacher fwd": t,
        "gen step: teacher bwd (inputs only)": INPUT_BACKWARD * t,
        "gen step: fake fwd": f,
        "gen step: fake bwd (inputs only)": INPUT_BACKWARD * f,
    }
    if recompute:
        passes.update({"recompute: psi fwd (fake step)": f, "recompute: G fwd": g,
                       "recompute: teacher fwd": t, "recompute: fake fwd (gen step)": f})
    return {name: float(cost) for name, cost in passes.items()}


def step_flops(unet_forward_flops: int, options, **kwargs) -> dict:
    """Model FLOPs of one iteration (``step_passes`` x F).

    Returns {"passes": {name: FLOPs}, "units_of_forward": model total / F, "total": model FLOPs
    (for MFU; no recompute), "total_with_recompute": the upper bound of executed FLOPs}.
    """
    passes = step_passes(options, **kwargs)
    units = sum(v for k, v in passes.items() if not k.startswith("recompute:"))
    with_recompute = sum(passes.values())
    return {"passes": {k: v * unet_forward_flops for k, v in passes.items()}, "units_of_forward": units,
            "total": units * unet_forward_flops, "total_with_recompute": with_recompute * unet_forward_flops}


def eager_equivalent(options):
    """The same StepOptions with torch.compile and CUDA graphs off: same FLOPs, countable by FlopCounterMode."""
    if options is None:
        return None
    return options.replace(compile="off", cuda_graph="off")


def counted_step_flops(make_state: Callable, options, train_step: Callable) -> int:
    """FlopCounterMode total of one eager-equivalent step of ``options`` on a fresh state.

    One step runs first (lazy initialisation, optimizer state), the second is counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    state = make_state()
    eager = eager_equivalent(options)
    train_step(state, options=eager)
    with FlopCounterMode(display=False) as counter:
        train_step(state, options=eager)
    del state
    return counter.get_total_flops()


__all__ = ["DENSE_BF16_PEAK", "peak_flops", "step_passes", "step_flops", "reuses_generator_sample",
           "counted_step_flops", "eager_equivalent"]

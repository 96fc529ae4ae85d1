"""The fast path of ``train_step``: the same SFD iteration as step.py, arranged for speed.

What differs from the reference path (step.py), and why it is still the same method:
- All random numbers of the step are drawn up front from ``state.rng`` in the reference's order
  (conditions, z, sigma_fake, eps_fake, [z_gen], sigma_gen, eps_gen), so with fp32 and no
  change of sampling the fast path reproduces the reference step (tests/test_fast_step.py).
- Frozen networks get input-only backward: ``backward(inputs=<trained params>)`` prunes every
  weight-gradient kernel of the teacher and the fake score in the generator step.
- ``share_noise`` + ``reuse_generator_sample``: G(z) is evaluated once with grad; its detached
  output trains the fake score and its graph serves the generator step. psi's update does not
  touch theta, so this equals the reference run with the same z (``StepOptions(share_noise=True)``).
  Not with ``config.train_dropout``: G then samples for the fake step in eval mode and trains in
  train mode, two different forwards.
- The config's schedule, fake-score clipping, EMA decay and dropout modes come from the same
  helpers as step.py (``fake_step_noise``, ``generator_step_sigma``, ``dropout_modes``).
- Optional: bf16 autocast, channels_last, torch.compile, gradient accumulation over micro-batches, and CUDA-graph capture of the whole step.

No ``.item()``, no boolean indexing and no data-dependent branch inside the step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dispatch, faults
from .forget import Conditions
from .grads import backward_inputs, frozen, sanitize_grads
from .losses import sfd_sample_weights
from .ema import ema_beta, update_ema
from .master_weights import full_precision_params
from .state import SFDState
from .step_options import StepOptions
from .substeps import dropout_modes, fake_step_noise, generator_step_sigma

log = logging.getLogger(__name__)
_RUNTIMES = "_fast_step_runtimes"  # attribute on the state holding compiled fns / captured graphs


# --------------------------------------------------------------------------- runtime setup

@dataclass
class _Runtime:
    """What one (state, options) pair builds once: resolved features, callables, graph buffers."""

    options: StepOptions
    loss_fns: dispatch.LossFunctions
    precision: str
    use_graph: bool
    rows: list  # per micro-batch: None (whole batch) or a LongTensor of row indices
    images_seen: torch.Tensor  # float64 (), set by the host before each step (EMA beta on device)
    reuse: bool = False  # share_noise + reuse_generator_sample in effect: one G forward per step
    generator: object = None
    fake_loss: object = None
    gen_loss: object = None
    calls: int = 0
    graph: object = None
    static_cond: Conditions | None = None
    static_metrics: dict = field(default_factory=dict)


def _unets(state: SFDState) -> list[nn.Module]:
    """The diffusers UNets inside the state's denoisers (for attention / memory-format setup)."""
    found = []
    for module in (state.teacher, state.fake, state.generator, state.generator_ema):
        for m in module.modules():
            if hasattr(m, "set_attn_processor") and m not in found and _classic_attention(m):
                found.append(m)
    return found


def _classic_attention(model: nn.Module) -> bool:
    """Whether every attention processor of a diffusers model is plain self/cross attention.

    Only those may be swapped for AttnProcessor2_0 / xformers; joint attention (SD3's
    JointAttnProcessor2_0, already SDPA) returns two streams and breaks under a plain processor.
    """
    return all(type(p).__name__ in ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor")
               for p in getattr(model, "attn_processors", {}).values())


def _resolve_attention(state: SFDState, choice: str) -> None:
    if choice in ("xformers", "auto"):
        reason = None
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # absent, or installed without its CUDA libraries
            reason = f"xformers is not importable ({type(exc).__name__}: {exc})"
        if reason is None and state.device.type != "cuda":
            reason = f"xformers needs a CUDA device; the state is on {state.device}"
        if reason is None:
            for unet in _unets(state):
                unet.enable_xformers_memory_efficient_attention()
            return
        if choice == "xformers":
            raise RuntimeError(f"attention='xformers' was requested but {reason}; use 'sdpa' or 'auto'")
        log.info("attention: using PyTorch SDPA (%s)", reason)
    from diffusers.models.attention_processor import AttnProcessor2_0

    for unet in _unets(state):
        unet.set_attn_processor(AttnProcessor2_0())


def _resolve_graph(state: SFDState, options: StepOptions) -> bool:
    if options.cuda_graph == "off":
        return False
    policy = getattr(state.config, "nonfinite_policy", "skip")
    if policy == "raise" and options.cuda_graph == "on":
        # "raise" reads the finite flag on the host inside the step: not allowed while capturing.
        raise ValueError("cuda_graph='on' cannot be combined with nonfinite_policy='raise' (it reads a device "
                         "flag on the host inside the step, which graph capture forbids); use "
                         "nonfinite_policy='skip' (device-side, counted) or cuda_graph='off'")
    reason = None
    if policy == "raise":
        reason = "nonfinite_policy='raise' syncs inside the step, which graph capture forbids"
    elif state.device.type != "cuda" or not torch.cuda.is_available():
        reason = f"CUDA graphs need a CUDA device; the state is on {state.device}"
    if reason is None:
        return True
    if options.cuda_graph == "on":
        raise RuntimeError(f"cuda_graph='on' was requested but {reason}; use 'auto' to fall back to eager")
    log.info("cuda_graph: off (%s)", reason)
    return False


class _MaybeCompiled:
    """torch.compile(fn); with compile='auto' the first failure switches to eager, logged once."""

    def __init__(self, fn, options: StepOptions, name: str):
        self.eager, self.name, self.strict = fn, name, options.compile == "on"
        self.fn = torch.compile(fn, backend=options.compile_backend, dynamic=False)

    def __call__(self, *args):
        try:
            return self.fn(*args)
        except Exception as exc:
            if self.strict or self.fn is self.eager:
                raise
            log.warning("compile: %s falls back to eager (%s: %s)", self.name, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            self.fn = self.eager
            return self.fn(*args)


def _micro_batch_rows(n_remain: int, n_forget: int, rounds: int, device) -> list:
    """Row indices of each micro-batch: an equal share of remain rows, then of forget rows."""
    if n_remain % rounds or n_forget % rounds:
        raise ValueError(f"accumulation_rounds={rounds} must divide batch_size={n_remain} and "
                         f"forget_batch_size={n_forget}")
    if rounds == 1:
        return [None]
    r, f = n_remain // rounds, n_forget // rounds
    return [torch.cat([torch.arange(k * r, (k + 1) * r), n_remain + torch.arange(k * f, (k + 1) * f)]).to(device)
            for k in range(rounds)]


def _build_runtime(state: SFDState, options: StepOptions) -> _Runtime:
    cfg, device = state.config, state.device
    rows = _micro_batch_rows(cfg.batch_size, cfg.forget_batch_size, options.accumulation_rounds, device)
    loss_fns = dispatch.resolve_backend(options.backend, device)
    _resolve_attention(state, options.attention)
    if options.channels_last:
        for module in (state.teacher, state.fake, state.generator, state.generator_ema):
            module.to(memory_format=torch.channels_last)
    use_graph = _resolve_graph(state, options)
    if use_graph:
        faults.make_capturable(state.opt_fake, device)
        faults.make_capturable(state.opt_gen, device)
    rt = _Runtime(options, loss_fns, options.precision, use_graph, rows,
                  torch.zeros((), dtype=torch.float64, device=device))
    rt.reuse = options.share_noise and options.reuse_generator_sample and len(rows) == 1
    if rt.reuse and state.trains_with_dropout:
        rt.reuse = False
        log.info("reuse_generator_sample: off (train_dropout=%s: G samples for the fake-score step without "
                 "dropout and trains with it, so one forward cannot serve both)", cfg.train_dropout)
    rt.generator, rt.fake_loss, rt.gen_loss = _step_functions(state, rt)
    if options.compile != "off":
        rt.generator = _MaybeCompiled(rt.generator, options, "generator")
        rt.fake_loss = _MaybeCompiled(rt.fake_loss, options, "fake-score loss")
        rt.gen_loss = _MaybeCompiled(rt.gen_loss, options, "generator loss")
    return rt


def _runtime(state: SFDState, options: StepOptions) -> _Runtime:
    """The runtime cached on the state, rebuilt if the networks or optimizers were replaced."""
    cache = state.__dict__.setdefault(_RUNTIMES, {})
    key = (options, *(id(x) for x in (state.teacher, state.fake, state.generator, state.opt_fake, state.opt_gen)))
    if key not in cache:
        cache[key] = _build_runtime(state, options)
    return cache[key]


# --------------------------------------------------------------------------- the step itself

def _step_functions(state: SFDState, rt: _Runtime):
    """(G(z, c), fake-score loss, generator loss): the three units torch.compile sees."""
    cfg, options = state.config, rt.options
    device_type = state.device.type
    bf16 = rt.precision == "bf16"
    # Autocast's weight-cast cache must stay off under graph capture (cached casts would be stale).
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=not rt.use_graph)) \
        if bf16 else contextlib.nullcontext
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format

    def generator(z, c):
        with autocast():
            return state.generator(z.contiguous(memory_format=memory_format), c)

    def fake_loss(x_g, sigma, eps, c, weight):
        x_t = (x_g + sigma.view(-1, 1, 1, 1) * eps).contiguous(memory_format=memory_format)
        with autocast():
            denoised = state.fake(x_t, sigma, c)
        return rt.loss_fns.edm_denoising_loss(denoised, x_g, weight)

    def gen_loss(x_g, sigma, eps, c_teacher, c_fake, weight):
        x_t = (x_g + sigma.view(-1, 1, 1, 1) * eps).contiguous(memory_format=memory_format)
        with autocast():
            # Teacher and fake stay two calls: a vmap over stacked weights fails inside GroupNorm
            # (torch 2.13: "NYI: querying is_contiguous inside of vmap"); see docs/fast_step.md.
            y_real = state.teacher(x_t, sigma, c_teacher)
            y_fake = state.fake(x_t, sigma, c_fake)
        return rt.loss_fns.sid_generator_loss(x_g, y_real, y_fake, weight, alpha=cfg.alpha,
                                              omega_min=cfg.omega_min)

    return generator, fake_loss, gen_loss


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _ema_update(state: SFDState, rt: _Runtime, batch_images: int) -> None:
    """ema.ema_beta + update_ema; under graph capture with beta computed on the device.

    Eager: beta from the host counters, one fused foreach lerp (the reference step's update).
    A replayed graph cannot take a new host scalar each step, so there beta is computed from
    ``rt.images_seen`` on the device and applied with per-tensor ``lerp_``: foreach lerp has no
    tensor-weight overload (torch 2.13), and a 0-d tensor passed as its scalar is read on the
    host, a sync every step and an error inside capture.
    """
    cfg = state.config
    params = full_precision_params(state.generator, state.opt_gen)
    if not rt.use_graph:
        beta = ema_beta(cfg.ema_halflife_kimg, cfg.ema_rampup_ratio, state.images_seen + batch_images, batch_images,
                        cfg.ema_decay)
        update_ema(state.generator_ema, state.generator, beta, params)
        return
    images_seen = rt.images_seen
    if cfg.ema_decay is not None:  # SFD DDPM code: a fixed decay, the same every replay
        weight = torch.full_like(images_seen, 1.0 - cfg.ema_decay).float()
    else:
        halflife = torch.full_like(images_seen, cfg.ema_halflife_kimg * 1000)
        if cfg.ema_rampup_ratio is not None:
            halflife = torch.minimum(halflife, images_seen * cfg.ema_rampup_ratio)
        weight = (1 - 0.5 ** (batch_images / halflife.clamp_min(1e-8))).float()
    with torch.no_grad():
        for p_ema, p in zip(state.generator_ema.parameters(), params):
            p_ema.lerp_(p, weight)
        for b_ema, b in zip(state.generator_ema.buffers(), state.generator.buffers()):
            b_ema.copy_(b)


def _step_body(state: SFDState, rt: _Runtime, cond: Conditions) -> dict[str, torch.Tensor]:
    """One SFD iteration given its conditions; everything after the label draw (capturable)."""
    cfg, options, device = state.config, rt.options, state.device
    n_r, n_f = cfg.batch_size, cfg.forget_batch_size
    n = n_r + n_f

    def noise():
        return torch.randn((n, *state.image_shape), generator=state.rng, device=device)

    # Same draw order as step.py: z, sigma_fake, eps_fake, [z_gen], sigma_gen, eps_gen.
    z_fake = noise()
    sigma_fake, w_fake = fake_step_noise(cfg, n, state.rng, device)
    eps_fake = noise()
    z_gen = z_fake if options.share_noise else noise()
    sigma_gen = generator_step_sigma(cfg, n, state.rng, device)
    eps_gen = noise()
    w_gen = sfd_sample_weights(n_r, n_f, cfg.lambda_g, cfg.gen_loss_scale, device=device)
    fake_params = [p for p in state.fake.parameters() if p.requires_grad]
    gen_params = [p for p in state.generator.parameters() if p.requires_grad]
    # One G forward serves both sub-steps (exact: psi's update leaves theta untouched). Not with
    # train_dropout: G then samples for the fake step without dropout and trains with it.
    reuse = rt.reuse
    x_g_kept = rt.generator(z_fake, cond.generator) if reuse else None

    # ---- fake-score step: EDM loss on detached G samples, accumulated over micro-batches
    state.opt_fake.zero_grad(set_to_none=True)
    loss_fake = torch.zeros((), device=device)
    nonfinite_fake = torch.zeros((), dtype=torch.long, device=device)
    with dropout_modes(state, "fake"):
        for rows in rt.rows:
            if reuse:
                x_g = x_g_kept.detach()
            else:
                with torch.no_grad():
                    x_g = rt.generator(_take(z_fake, rows), _take(cond.generator, rows))
            loss, per_sample = rt.fake_loss(x_g, _take(sigma_fake, rows), _take(eps_fake, rows),
                                            _take(cond.fake_train, rows), _take(w_fake, rows))
            loss.backward(inputs=backward_inputs(fake_params))  # None under FSDP2
            loss_fake = loss_fake + loss.detach()
            nonfinite_fake = nonfinite_fake + (~torch.isfinite(per_sample)).sum()
    update_ok = faults.check_finite(loss_fake, fake_params, nonfinite_fake == n)
    sanitize_grads(fake_params, cfg.fake_grad_clip_value)
    skipped_fake = faults.guarded_step(state, "fake", state.opt_fake, update_ok)

    # ---- generator step: SiD loss, teacher at override labels; input-only backward through phi, psi
    state.opt_gen.zero_grad(set_to_none=True)
    loss_gen = torch.zeros((), device=device)
    sum_remain = torch.zeros((), device=device)
    sum_forget = torch.zeros((), device=device)
    nonfinite_gen = torch.zeros((), dtype=torch.long, device=device)
    r_per = n_r // len(rt.rows)
    with dropout_modes(state, "gen"), frozen(state.fake):
        for rows in rt.rows:
            x_g = x_g_kept if reuse else rt.generator(_take(z_gen, rows), _take(cond.generator, rows))
            loss, per_sample = rt.gen_loss(x_g, _take(sigma_gen, rows), _take(eps_gen, rows),
                                           _take(cond.teacher, rows), _take(cond.generator, rows),
                                           _take(w_gen, rows))
            loss.backward(inputs=backward_inputs(gen_params))
            finite = torch.isfinite(per_sample)
            clean = torch.where(finite, per_sample, torch.zeros_like(per_sample)).detach()
            loss_gen = loss_gen + loss.detach()
            sum_remain = sum_remain + clean[:r_per].sum()
            sum_forget = sum_forget + clean[r_per:].sum()
            nonfinite_gen = nonfinite_gen + (~finite).sum()
    update_ok = faults.check_finite(loss_gen, gen_params, nonfinite_gen == n)
    sanitize_grads(gen_params, cfg.grad_clip_value)
    skipped_gen = faults.guarded_step(state, "gen", state.opt_gen, update_ok)

    _ema_update(state, rt, n)
    return {"loss_fake": loss_fake, "nonfinite_fake": nonfinite_fake, "loss_gen": loss_gen,
            "loss_gen_remain": sum_remain / n_r, "loss_gen_forget": sum_forget / n_f,
            "nonfinite_gen": nonfinite_gen, **skipped_fake, **skipped_gen}


def _graph_step(state: SFDState, rt: _Runtime, cond: Conditions) -> dict[str, torch.Tensor]:
    """Warm up eagerly on a side stream, capture the whole step once, then replay it."""
    if rt.calls < rt.options.warmup_steps:  # real training steps that also trigger lazy init/compile
        rt.calls += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            metrics = _step_body(state, rt, cond)
        torch.cuda.current_stream().wait_stream(side)
        return metrics
    if rt.graph is None:
        rt.static_cond = Conditions(*(t.clone() for t in (cond.generator, cond.teacher, cond.fake_train)))
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(state.rng)  # replays draw fresh noise from the state's RNG
        if state.dropout_rng is not None:
            graph.register_generator_state(state.dropout_rng)  # and fresh dropout masks
        with torch.cuda.graph(graph):
            rt.static_metrics = _step_body(state, rt, rt.static_cond)
        rt.graph = graph  # capture recorded the step without running it; the replay below runs it
    else:
        for static, new in zip((rt.static_cond.generator, rt.static_cond.teacher, rt.static_cond.fake_train),
                               (cond.generator, cond.teacher, cond.fake_train)):
            static.copy_(new)
    rt.graph.replay()
    return {k: v.clone() for k, v in rt.static_metrics.items()}


def fast_train_step(state: SFDState, options: StepOptions) -> dict[str, torch.Tensor]:
    """One SFD iteration on the fast path; metrics as 0-d tensors (keys as ``step.train_step``).

    Usually reached as ``train_step(state, options=...)``. The first call builds (and caches on
    the state) the resolved features: attention processor, channels_last weights, compiled
    functions, capturable optimizers; with CUDA graphs the first ``warmup_steps`` calls run eagerly.
    """
    if not options.fused:
        raise ValueError("fast_train_step needs StepOptions(fused=True); the reference path is step.train_step")
    cfg = state.config
    rt = _runtime(state, options)
    batch_images = cfg.batch_size + cfg.forget_batch_size
    # Labels are drawn eagerly (ForgetSpec builds small host tables); noise is drawn in the step.
    cond = state.forget.sample_conditions(cfg.batch_size, cfg.forget_batch_size, state.rng, state.device)
    rt.images_seen.fill_(state.images_seen + batch_images)  # host -> device write, no sync
    metrics = _graph_step(state, rt, cond) if rt.use_graph else _step_body(state, rt, cond)
    state.images_seen += batch_images
    state.step += 1
    return metrics


__all__ = ["fast_train_step"]

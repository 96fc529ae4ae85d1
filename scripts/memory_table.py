"""Memory per GPU of an SFD run on published text-to-image teachers, from shapes alone (no weights).

    python scripts/memory_table.py                     # writes docs/memory.md and docs/memory.json
    python scripts/memory_table.py --models sd15 sdxl --batch 4 --gpu-gib 80 --out /tmp/mem

Each denoiser of ``sfd_fast.models.published_configs`` is instantiated on ``torch.device("meta")``
(shapes and dtypes, no storage), its parameters and buffers are counted exactly, and the
three-network state (frozen teacher, trained fake score and generator with their gradients and
Adam moments, the generator's EMA) is priced per parameter the way ``sfd_fast`` keeps it
(``core/state.py``, ``core/master_weights.py``, ``train/text_to_image.py``, ``train/distributed.py``).

Activations: one forward per network role at the native latent size and batch 1, on meta tensors,
under ``torch.autograd.graph.saved_tensors_hooks``: the bytes autograd keeps for backward, counted
once per storage (meta tensors have storages; all saved ones are alive while the graph holds them,
so a storage's identity is unique), excluding the network's own parameters and buffers.
``F.scaled_dot_product_attention`` is routed to the fused (flash) kernel's op, whose saved set is
q, k, v, out and the log-sum-exp, as on a GPU; on meta tensors it would otherwise take the math
fallback and save every L x L attention matrix. With gradient checkpointing, the diffusers blocks
are checkpointed through a counting wrapper: it adds each block's inputs (kept for the recompute)
and measures the block's own saved bytes (held once, during that block's recompute in backward).

Nothing here runs a real network or allocates its memory: each model takes 10-60 s on one CPU core
(Python overhead of the meta forwards), whatever its size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30

# ---- what the library keeps, per denoiser parameter (bytes) -------------------------------------


@dataclass(frozen=True)
class Mode:
    """One memory configuration the library supports (T2IOptions fields in ``flags``)."""

    name: str
    flags: str                # how to ask for it
    teacher: int              # frozen teacher weight bytes (teacher_precision)
    weight: int               # trained weight bytes, fake and G each
    grad: int                 # gradient bytes kept per trained parameter (incl. fp32 copies on masters)
    optimizer: int            # Adam m + v (+ fp32 master) bytes per trained parameter
    ema: int                  # EMA of G (always fp32: it averages the fp32 values)
    ddp_bucket: int           # DDP's flat gradient buckets (gradient_as_bucket_view off), per trained parameter
    teacher_act: torch.dtype  # dtype the teacher computes in
    trained_act: torch.dtype  # dtype fake and G compute in
    trained_buffer: int       # bytes per buffer element in fake / G (use_master_weights leaves buffers fp32)
    teacher_buffer: int       # bytes per buffer element in the teacher (unet.to(bf16) casts buffers too)
    fsdp_flags: str           # the FSDPOptions of the same configuration under distribute_state(state, "fsdp")
    checkpointing: bool = False

    @property
    def per_trained(self) -> int:
        return self.weight + self.grad + self.optimizer

    @property
    def per_param(self) -> int:
        """Persistent bytes per denoiser parameter, single process: teacher + 2 trained + EMA."""
        return self.teacher + 2 * self.per_trained + self.ema


FP32, BF16 = torch.float32, torch.bfloat16
MODES = (
    # T2IOptions() defaults: everything fp32. Adam moments follow the fp32 params; grads fp32.
    Mode("fp32", "T2IOptions() (defaults)", 4, 4, 4, 8, 4, 4, FP32, FP32, 4, 4, "FSDPOptions()"),
    # teacher_precision="bf16": frozen teacher in bf16 (no optimizer, no master); trained nets fp32.
    Mode("bf16 teacher", 'teacher_precision="bf16"', 2, 4, 4, 8, 4, 4, BF16, FP32, 4, 2,
         'FSDPOptions(teacher_dtype="bf16")'),
    # + trained_precision="bf16": weights/grads bf16, MasterWeightAdam keeps fp32 masters (4) and Adam
    # moments (8); the fp32 gradient copy its step() makes is freed right after the Adam step.
    Mode("bf16 + fp32 masters", 'teacher_precision="bf16", trained_precision="bf16"',
         2, 2, 2, 8 + 4, 4, 2, BF16, BF16, 4, 2, 'FSDPOptions(param_dtype="bf16", teacher_dtype="bf16")'),
    Mode("bf16 + fp32 masters + grad ckpt", 'teacher_precision="bf16", trained_precision="bf16", '
         'gradient_checkpointing=True', 2, 2, 2, 8 + 4, 4, 2, BF16, BF16, 4, 2,
         'FSDPOptions(param_dtype="bf16", teacher_dtype="bf16", activation_checkpointing=True)', checkpointing=True),
)


def state_bytes(mode: Mode, params: int, buffers: int, ddp: bool = False) -> int:
    """Persistent bytes per GPU without sharding: teacher, fake + G (weights, grads, optimizer), EMA, buffers.

    ``ddp``: under torchrun with W > 1, plus DDP's flat gradient buckets of the two wrapped networks.
    """
    buf = buffers * (mode.teacher_buffer + 2 * mode.trained_buffer + 4)
    bucket = 2 * params * mode.ddp_bucket if ddp else 0
    return params * mode.per_param + bucket + buf


@dataclass(frozen=True)
class Units:
    """FSDP2 units of a denoiser: the blocks it is sharded by, and the rest (gathered for the whole pass)."""

    largest: int   # parameters of the largest block unit
    root: int      # parameters outside every block unit


def fsdp_units(net: torch.nn.Module) -> Units:
    """UNets: each down / mid / up block, as ``train/distributed.py::_shard_units`` shards them (the UNet's
    stem, embeddings and head are the root). Transformers: each of ``transformer_blocks`` (an assumption:
    ``_shard_units`` finds no UNet there and makes the whole network one unit today; see the doc)."""
    if hasattr(net, "down_blocks") and hasattr(net, "up_blocks"):
        blocks = [*net.down_blocks, *([net.mid_block] if getattr(net, "mid_block", None) is not None else []),
                  *net.up_blocks]
    else:
        blocks = list(net.transformer_blocks)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in net.parameters())
    return Units(max(sizes), total - sum(sizes))


def fsdp_state_bytes(mode: Mode, params: int, buffers: int, units: Units, world: int, shard_teacher: bool) -> dict:
    """Per-GPU bytes under FSDP2 as ``distribute_state(state, "fsdp", mode.fsdp_flags)`` shards the state.

    Fake and G: fp32 shards + fp32 grad shards + Adam m, v (16 B / W each: under FSDP2 the fp32 shards are
    the masters, MasterWeightAdam is refused); EMA fp32 sharded (4 / W). Teacher replicated in its dtype, or
    sharded like the others (fp32 shards, 4 / W). Buffers are replicated. Working set (unsharded, transient):
    the root units stay gathered through forward and backward (FSDP2 does not reshard the root after forward)
    for G and the fake score (and a sharded teacher), two block units in the compute dtype (current +
    prefetched), and backward's unsharded gradients of one block and of G's root (bf16 compute + the fp32
    copy reduced when param_dtype is bf16).
    """
    compute = 2 if mode.trained_act == BF16 else 4
    grad = compute + 4 if compute == 2 else 4
    teacher = params * 4 // world if shard_teacher else params * mode.teacher
    sharded = (2 * params * 16 + params * 4) // world
    teacher_buf = 4 if shard_teacher else mode.teacher_buffer
    buf = buffers * (teacher_buf + 2 * 4 + 4)
    roots = 3 if shard_teacher else 2
    working = roots * units.root * compute + 2 * units.largest * compute + (units.largest + units.root) * grad
    return {"state": teacher + sharded + buf, "working_set": working, "total": teacher + sharded + buf + working}


# ---- counting saved tensors ---------------------------------------------------------------------


class FusedAttention(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to the fused flash kernel's op.

    ``aten._scaled_dot_product_flash_attention_for_cpu`` has meta and CPU kernels, and autograd saves
    what CUDA's fused kernels save (q, k, v, out, log-sum-exp; CUDA adds two RNG scalars). Without it,
    meta tensors take the math fallback, which keeps every (L x L) attention matrix for backward.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        for name, value in zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:]):
            kwargs[name] = value
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:  # the op takes an additive float mask
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
            attn_mask=mask, scale=kwargs.get("scale"))[0]


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it). Valid on meta and real tensors alike, while
    the storage is alive: the counter holds every tensor it counts, so no identity is reused."""
    return t.untyped_storage()._cdata


class SavedTensorCounter:
    """Pack hook for ``saved_tensors_hooks``: bytes of distinct storages saved, minus ``exclude``'s."""

    def __init__(self, exclude=(), key=storage_key):
        self.key = key
        self.excluded = {key(t) for t in exclude}
        self.storages: dict[int, tuple[int, torch.Tensor]] = {}
        self.saves = 0
        self.raw_bytes = 0  # every save counted, no dedupe: the upper bound a naive count gives

    def add(self, t: torch.Tensor) -> None:
        k = self.key(t)
        if k not in self.excluded and k not in self.storages:
            self.storages[k] = (t.untyped_storage().nbytes(), t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saves += 1
        self.raw_bytes += t.numel() * t.element_size()
        self.add(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(n for n, _ in self.storages.values())


@dataclass
class Activations:
    """Bytes one forward keeps for backward (batch as measured)."""

    saved: int               # distinct storages autograd holds at the end of the forward
    raw: int                 # the same without dedupe (every save counted)
    saves: int               # number of saved-tensor packs
    largest_block: int = 0   # with checkpointing: the largest checkpointed block's own saved bytes


def measure_forward(model: torch.nn.Module, inputs: dict, trained: bool, checkpointing: bool = False,
                    fused_attention: bool = True, key=storage_key) -> Activations:
    """Saved-for-backward bytes of ``model(**inputs)`` as SFD runs it.

    ``trained``: weights require grad and the input does not (G, and the fake score in its own step);
    else weights are frozen and the latent input requires grad (teacher and fake score in the
    generator step: gradients reach x_g through their inputs only). ``model`` may live on meta.
    """
    model.requires_grad_(trained).train(trained)
    exclude = [*model.parameters(), *model.buffers()]
    counter = SavedTensorCounter(exclude, key)
    block = {"saved": 0}
    if checkpointing:
        def counting_checkpoint(module, *args):
            for a in args:  # kept alive by the recompute closure
                if torch.is_tensor(a):
                    counter.add(a)
            inner = SavedTensorCounter(exclude, key)
            with saved_tensors_hooks(inner.pack, lambda t: t):  # what this block's recompute will hold
                module(*args)
            block["saved"] = max(block["saved"], inner.bytes)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        model.enable_gradient_checkpointing(counting_checkpoint)
    x = inputs.get("sample", inputs.get("hidden_states"))
    x.requires_grad_(not trained)
    try:
        with (FusedAttention() if fused_attention else _null()), saved_tensors_hooks(counter.pack, lambda t: t):
            model(**inputs)
    finally:
        x.requires_grad_(False)
        if checkpointing:
            model.disable_gradient_checkpointing()
    return Activations(counter.bytes, counter.raw_bytes, counter.saves, block["saved"])


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- one model ----------------------------------------------------------------------------------


def per_sample_activations(mode: Mode, acts: dict, cfg_factor: int) -> dict:
    """Bytes per sample of each SFD sub-step's peak (SPEC section 6), from batch-1 forwards.

    fake step: fake score with weight grads, CFG batch (cfg_factor x); G runs under no_grad.
    generator step: G with weight grads (no CFG), teacher and fake score frozen (input grads), CFG batch.
    With checkpointing: retained inputs of all three nets + one block's recompute (the largest).
    """
    tr, tt, tf = acts["trained"], acts["teacher_frozen"], acts["trained_frozen"]
    fake_step = cfg_factor * tr.saved + (cfg_factor * tr.largest_block if mode.checkpointing else 0)
    gen_step = tr.saved + cfg_factor * (tt.saved + tf.saved)
    if mode.checkpointing:
        gen_step += max(tr.largest_block, cfg_factor * tt.largest_block, cfg_factor * tf.largest_block)
    return {"fake_step": fake_step, "generator_step": gen_step, "peak": max(fake_step, gen_step)}


def analyse(model, modes=MODES, worlds=(2, 4, 8), cfg_factor: int = 2, batch: int = 1,
            gpu_gib: float = 80.0, check_linearity: bool = True) -> dict:
    """Everything the table needs for one PublishedModel, as a JSON-ready dict."""
    t0 = time.time()
    net = {dt: model.build_denoiser("meta", dt) for dt in (FP32, BF16)}
    params = sum(p.numel() for p in net[FP32].parameters())
    buffers = sum(b.numel() for b in net[FP32].buffers())
    text = {s.component: {"class": s.cls, "params": sum(p.numel() for p in s.build("meta").parameters()),
                          "droppable_after_encoding": s.droppable_after_encoding, "source": s.source}
            for s in model.text_encoders}
    cache: dict = {}

    def forward(dtype, trained, ckpt):
        k = (dtype, trained, ckpt)
        if k not in cache:
            cache[k] = measure_forward(net[dtype], model.denoiser_inputs(1, "meta", dtype), trained, ckpt)
        return cache[k]

    linearity = None
    if check_linearity:  # activations per sample: batch 2 vs 2 x batch 1
        two = measure_forward(net[BF16], model.denoiser_inputs(2, "meta", BF16), True).saved
        linearity = two / (2 * forward(BF16, True, False).saved)
    units = fsdp_units(net[FP32])
    rows = []
    for mode in modes:
        acts = {"trained": forward(mode.trained_act, True, mode.checkpointing),
                "teacher_frozen": forward(mode.teacher_act, False, mode.checkpointing),
                "trained_frozen": forward(mode.trained_act, False, mode.checkpointing)}
        act = per_sample_activations(mode, acts, cfg_factor)
        per_gpu = {"single": state_bytes(mode, params, buffers),
                   "ddp": state_bytes(mode, params, buffers, ddp=True)}
        fsdp = {}
        for w in worlds:
            for shard in (False, True):
                key = f"fsdp{w}_{'shard' if shard else 'repl'}"
                fsdp[key] = fsdp_state_bytes(mode, params, buffers, units, w, shard)
                per_gpu[key] = fsdp[key]["total"]
        peak = {k: v + batch * act["peak"] for k, v in per_gpu.items()}
        fits = {k: max(0, int((gpu_gib * GIB - v) // act["peak"])) for k, v in per_gpu.items()}
        rows.append({"mode": mode.name, "flags": mode.flags, "bytes_per_param": mode.per_param,
                     "bytes_per_trained_param": mode.per_trained,
                     "state_bytes": per_gpu, "fsdp_breakdown": fsdp,
                     "activation_bytes_per_sample": act,
                     "forwards": {k: asdict(v) for k, v in acts.items()},
                     "peak_bytes_at_batch": peak, "samples_per_gpu_that_fit": fits})
    return {"name": model.name, "title": model.title, "hub_id": model.hub_id, "denoiser": model.denoiser_cls,
            "denoiser_source": model.denoiser_source, "params": params, "buffer_elements": buffers,
            "published_params": model.published_params, "published_params_source": model.published_params_source,
            "latent_shape": list(model.latent_shape), "text_tokens": model.text_tokens, "text_encoders": text,
            "fsdp_units": {"largest_block_params": units.largest, "root_params": units.root},
            "activation_linearity_batch2_over_2x_batch1": linearity, "rows": rows,
            "seconds": round(time.time() - t0, 1)}


# ---- report -------------------------------------------------------------------------------------


def _g(b: float) -> str:
    return f"{b / GIB:.1f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def markdown(report: dict) -> str:
    a = report["args"]
    worlds = a["worlds"]
    lines = [
        "# Memory per GPU for SFD on published text-to-image models",
        "",
        f"Generated by `{report['command']}` on {report['date']} (torch {report['torch']}, diffusers "
        f"{report['diffusers']}, transformers {report['transformers']}; shapes only: every network is built on "
        "`torch.device(\"meta\")`, no weights are read). The JSON beside this file holds every number below and "
        "the forwards they come from. GiB = 2^30 bytes.",
        "",
        "Three copies of the denoiser (frozen teacher, trained fake score, trained one-step generator G), Adam for",
        "the two trained ones, an fp32 EMA of G. Text encoders are frozen and only encode prompts: the library",
        "caches each prompt's embedding once, so they can be freed from the GPU before training (they are not in",
        "the table; their sizes are listed under *Models*). VAE is used only to decode samples.",
        "",
        "## Bytes per denoiser parameter (the formula)",
        "",
        "P = denoiser parameters, N = buffer elements (SD3's positional table, PixArt's), W = ranks.",
        "",
        "| piece | " + " | ".join(m["name"] for m in report["modes"]) + " |",
        "| --- |" + " --- |" * len(report["modes"]),
    ]
    pieces = [("teacher weights (frozen)", lambda m: f"{m['teacher']}"),
              ("fake score: weights + grads + Adam (m, v, master)",
               lambda m: f"{m['weight']} + {m['grad']} + {m['optimizer']}"),
              ("generator G: same", lambda m: f"{m['weight']} + {m['grad']} + {m['optimizer']}"),
              ("EMA of G (fp32)", lambda m: f"{m['ema']}"),
              ("**total, one process**", lambda m: f"**{m['per_param']}**"),
              ("DDP buckets (W > 1): 2 x grad dtype", lambda m: f"+{2 * m['ddp_bucket']}"),
              ("FSDP2: fake + G + EMA, sharded", lambda m: "(2 x 16 + 4) / W"),
              ("FSDP2: teacher replicated / sharded", lambda m: f"{m['teacher']} / (4 / W)"),
              ("activations computed in", lambda m: f"teacher {m['teacher_act']}, fake/G {m['trained_act']}")]
    for label, cell in pieces:
        lines.append(f"| {label} | " + " | ".join(cell(m) for m in report["modes"]) + " |")
    lines += [
        "",
        "- Per GPU, one process: `P x total + N x (b_teacher_buffer + 2 x b_trained_buffer + 4)` (buffers: 4 bytes in",
        "  fp32 nets, 2 in a bf16 teacher; `use_master_weights` leaves buffers fp32).",
        "- DDP (torchrun, W > 1): the same plus `P x 2 x b_grad` for the two DDP-wrapped nets' flat gradient",
        "  buckets (`SFDDataParallel` keeps DDP's default `gradient_as_bucket_view=False`). It does not fall with W.",
        "- FSDP2 (`distribute_state(state, \"fsdp\", FSDPOptions(...))`, `train/distributed.py`; the FSDPOptions of each",
        "  mode are in its heading): `MasterWeightAdam` is refused there, the fp32 shards are the masters. Per GPU:",
        "  `P x (2 x (4 + 4 + 8) + 4) / W` (fake and G: fp32 shard, fp32 grad shard, Adam m, v; EMA fp32) + teacher",
        "  (`P x b_teacher` replicated, or `P x 4 / W` sharded: fp32 shards gathered in the compute dtype) + buffers",
        "  (replicated) + the working set `n_roots x root x c + 2 x unit x c + (unit + root) x g`, with c = compute",
        "  bytes (2 bf16, 4 fp32), g = unsharded grad bytes (2 + 4 with bf16 compute, 4 in fp32), unit = the largest",
        "  block unit, root = parameters outside the block units (gathered for the whole pass: FSDP2 keeps the root",
        "  unsharded after forward), n_roots = 2 (G, fake) or 3 with a sharded teacher. Units: each down/mid/up block",
        "  of a UNet, as `_shard_units` shards them; each transformer block of SD3 / PixArt (**assumed**: today",
        "  `_shard_units` finds no UNet in a transformer and makes the whole network one unit, which gathers all of",
        "  G and the fake score at once; see *Findings*). No DDP buckets.",
        "- In the masters modes the grad column is `2`: the fp32 copy `MasterWeightAdam.step` makes of each gradient",
        "  (`master.grad = p.grad.float()`, 4 B) is freed right after the Adam step, so it is a transient of the",
        "  optimizer step, not persistent state (until this table showed it, it lived to the next `zero_grad`: 46 B/param).",
        f"- Activations: `peak = state + b x A`, with b samples per GPU and A the per-sample peak of the generator",
        f"  step: `A = a_train(G) + {a['cfg_factor']} x (a_frozen(teacher) + a_frozen(fake))` ({a['cfg_factor']} = CFG: teacher and",
        "  fake score run cond + uncond in one batch at the library's default guidance 4.5; G runs without CFG).",
        "  The fake step needs `2 x a_train(fake)` and is always smaller. With gradient checkpointing each `a` is the",
        "  retained part (non-checkpointed ops and every block's inputs) and the largest block's recompute is added once.",
        "",
        f"## Peak per GPU at {a['batch']} sample(s) per GPU (GiB): state + activations",
        "",
    ]
    ex = next((m for m in report["models"] if m["name"] == "sd15"), report["models"][0])
    exr = ex["rows"][2] if len(ex["rows"]) > 2 else ex["rows"][0]
    exm = next(m for m in report["modes"] if m["name"] == exr["mode"])
    lines += [f"Check a cell by hand: {ex['title']}, {exr['mode']}, 1 GPU = {ex['params']:,} x {exm['per_param']} B"
              f" + {ex['buffer_elements']:,} buffer elements = {_g(exr['state_bytes']['single'])} GiB of state, plus "
              f"{a['batch']} x {_g(exr['activation_bytes_per_sample']['peak'])} GiB of activations = "
              f"{_g(exr['peak_bytes_at_batch']['single'])} GiB.", ""]
    cols = ["single", "ddp"] + [f"fsdp{w}_{s}" for w in worlds for s in ("repl", "shard")]
    head = ["1 GPU", "DDP"] + [f"FSDP W={w} T {'repl' if s == 'repl' else 'shard'}" for w in worlds for s in ("repl", "shard")]
    for mi, mode in enumerate(report["modes"]):
        flags = mode["flags"] if mode["flags"].startswith("T2IOptions") else f"T2IOptions({mode['flags']})"
        lines += [f"### {mode['name']}: `{flags}`; FSDP columns `{mode['fsdp_flags']}`", "",
                  "| model | params | act/sample | " + " | ".join(head) + " |",
                  "| --- | ---: | ---: |" + " ---: |" * len(head)]
        for m in report["models"]:
            r = m["rows"][mi]
            lines.append(f"| {m['title']} | {_count(m['params'])} | {_g(r['activation_bytes_per_sample']['peak'])} | "
                         + " | ".join(_g(r["peak_bytes_at_batch"][c]) for c in cols) + " |")
        lines.append("")
    lines += [f"## Samples per GPU that fit in {a['gpu_gib']:g} GiB (largest b with state + b x A <= {a['gpu_gib']:g} GiB; 0 = not even one sample)", "",
              "| model | mode | 1 GPU | DDP | " + " | ".join(head[2:]) + " |", "| --- | --- |" + " ---: |" * len(head)]
    for m in report["models"]:
        for r in m["rows"]:
            lines.append(f"| {m['title']} | {r['mode']} | " + " | ".join(str(r["samples_per_gpu_that_fit"][c]) for c in cols) + " |")
    lines += ["", "## Models (measured on meta) and where their configs come from", "",
              "| model | denoiser | params (measured) | published | buffers | latents | text tokens | FSDP units: largest block / root |",
              "| --- | --- | ---: | --- | ---: | --- | ---: | --- |"]
    for m in report["models"]:
        lines.append(f"| {m['title']} | `{m['denoiser']}` | {m['params']:,} | ~{_count(m['published_params'])} "
                     f"({m['published_params_source']}) | {m['buffer_elements']:,} | {'x'.join(map(str, m['latent_shape']))} | "
                     f"{m['text_tokens']} | {_count(m['fsdp_units']['largest_block_params'])} / {_count(m['fsdp_units']['root_params'])} |")
    lines += ["", "Text encoders (frozen; droppable once the prompts are encoded):", "",
              "| model | component | class | params |", "| --- | --- | --- | ---: |"]
    for m in report["models"]:
        for comp, t in m["text_encoders"].items():
            lines.append(f"| {m['title']} | {comp} | `{t['class']}` | {t['params']:,} |")
    lines += ["", "Config sources: see the docstring and each preset of `sfd_fast/models/published_configs.py`", ""]
    for m in report["models"]:
        lines.append(f"- {m['title']}: {m['denoiser_source']}.")
    lines += ["", "## Activations per sample, per forward (GiB, batch 1, native latent size)", "",
              "| model | dtype | G / fake, weight grads | teacher / fake, input grads | with ckpt: retained (train / frozen) | largest block recompute (train / frozen) | raw saves, no dedupe (train) | batch 2 / (2 x batch 1) |",
              "| --- | --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for m in report["models"]:
        f = {r["mode"]: r["forwards"] for r in m["rows"]}
        fp, bf, ck = f["fp32"], f["bf16 + fp32 masters"], f["bf16 + fp32 masters + grad ckpt"]
        for dt, fw in (("fp32", fp), ("bf16", bf)):
            ckpt = (f"{_g(ck['trained']['saved'])} / {_g(ck['trained_frozen']['saved'])}" if dt == "bf16" else "")
            blk = (f"{_g(ck['trained']['largest_block'])} / {_g(ck['trained_frozen']['largest_block'])}" if dt == "bf16" else "")
            lin = f"{m['activation_linearity_batch2_over_2x_batch1']:.4f}" if dt == "bf16" and m["activation_linearity_batch2_over_2x_batch1"] else ""
            lines.append(f"| {m['title']} | {dt} | {_g(fw['trained']['saved'])} | {_g(fw['trained_frozen']['saved'])} | "
                         f"{ckpt} | {blk} | {_g(fw['trained']['raw'])} | {lin} |")
    lines += ["", FINDINGS, "", METHOD_NOTES, ""]
    return "\n".join(lines)


FINDINGS = """## Findings

- **The frozen teacher is not the big item; the two trained copies are.** Each trained network costs 16-20 B per
  parameter (weights, grads, Adam), the teacher 2-4 and the EMA 4. A single 80 GiB GPU holds SD1.5 and
  PixArt-Sigma in every mode; SDXL, SD3-medium and SD3.5-large fit in no single-GPU or DDP mode, even at one
  sample (their state alone is 73-376 GiB). DDP does not help (it replicates everything and adds gradient
  buckets); sharding does: at W = 8 with checkpointing every model fits, SD3.5-large with a few samples per GPU.
- **Activations dominate without checkpointing** at native resolution for the 1024 px models (SDXL, SD3,
  PixArt: 18-71 GiB per sample in bf16, because the generator step keeps G's graph plus the teacher's and the
  fake score's, both with CFG, alive at once). Gradient checkpointing divides them by 5 (SD1.5) to 15 (SD3.5).
- **SDXL's FSDP units are coarse.** Sharding per down/mid/up block makes `up_blocks[0]` (1.21B parameters, 47%
  of the UNet) one unit: the unsharded working set is ~11-14 GiB per GPU at any W. Wrapping each transformer
  block and resnet instead (the modules diffusers checkpoints, at most 49M parameters each in SDXL) would
  bring it to ~1.3 GiB by the same formula.
- **bf16 + fp32 masters: 38 B/param, 2 less than fp32.** This table found that `MasterWeightAdam.step` kept its fp32
  gradient copies until the next `zero_grad` (46 B/param, more than fp32); they are now freed right after the
  Adam step. (Under FSDP2 the question does not arise: the fp32 shards are the masters.)
- **FSDP2 units for transformers.** `train/distributed.py::_shard_units` shards UNets per down/mid/up block but
  makes an SD3 / PixArt transformer a single unit (it looks for `down_blocks`), so G and the fake score are
  gathered whole during their passes: for SD3.5-large that adds about 2 x 8.06B x 2 B (bf16 params) + 8.06B x 6 B
  (unsharded grads) ~ 75 GiB per GPU to the table's FSDP columns, which assume per-`transformer_blocks` units.
  `FSDPOptions(activation_checkpointing=True)` likewise requires a UNet today. Both are one-line changes in that
  function (wrap `transformer_blocks`; call the transformer's `enable_gradient_checkpointing`).
- **Text encoders are not freed by the library itself.** They are needed only until the prompts are encoded
  (`PromptConditions.encode` in `build_t2i_state`). `sfd-fast distill` passes a temporary pipeline, so they go
  with it unless something else holds the pipeline; a Python caller that keeps `pipe` keeps them on the GPU:
  T5-XXL (SD3, SD3.5, PixArt-Sigma) is 4.76B parameters, 8.9 GiB in bf16 and 17.7 GiB in fp32
  (`load_t2i_pipeline`'s default dtype). Delete them or move them to the CPU after `build_t2i_state`.
- **The fused step (`train_step(state, options="fused")`) peaks differently** from the reference step priced
  here: it frees G's gradients before the generator step (-P x b_grad at that peak), but by default reuses one G
  forward for both sub-steps, so G's graph stays alive through the fake step (fake step = a_train(G) +
  2 x a_train(fake), still below the generator step)."""


METHOD_NOTES = """## How the activations were counted, and what that misses

- **Method.** Each forward runs on meta tensors under `torch.autograd.graph.saved_tensors_hooks`; the pack
  hook records the storage of every tensor autograd saves for backward. Bytes are summed once per distinct
  storage (views and re-saves of one tensor count once; meta tensors do have storages, and every counted one
  is kept alive by the graph, so storage identity is unique), and the network's own parameters and buffers
  are excluded (they are in the state). The "raw" column sums every save without that dedupe: it over-counts
  by 1.4-3x and is shown only to size the effect. `tests/test_memory_table.py` checks the counter on a tiny
  UNet: meta tensors give exactly the bytes a real CPU forward saves (deduplicated there by data pointer).
- **Roles.** G and the fake score in its own step train their weights (their linear/conv inputs are saved);
  teacher and fake score in the generator step are frozen and only pass gradients to their input (autograd
  then saves far less: no weight-gradient inputs). All three generator-step graphs are alive together before
  `backward()`: that is the iteration's peak.
- **Attention.** `F.scaled_dot_product_attention` is routed to the fused flash kernel's op, so q, k, v, out and
  the log-sum-exp are saved, as with CUDA's flash / memory-efficient kernels. On meta tensors the math fallback
  would otherwise be taken and every L x L attention matrix saved (many GiB at 4096 tokens). The fp32 rows
  assume a fused kernel too (memory-efficient attention takes fp32 on CUDA).
- **Checkpointing.** `enable_gradient_checkpointing()` works on meta (non-reentrant `torch.utils.checkpoint`).
  The recompute itself happens only in backward, which is not run; so the checkpointed numbers are a computed
  bound: retained tensors (measured) + the largest block's saved bytes (measured by running that block alone
  under its own counter), i.e. what backward holds while recomputing the biggest block.
- **Not counted:** forward temporaries freed before the forward ends; backward transients (activation
  gradients of one or two layers at a time, kernel workspaces); the caching allocator's slack and
  fragmentation (often 5-20%); CUDA context and NCCL buffers (~0.5-1 GiB); `compute_precision="bf16"` autocast
  (autocast does not apply to meta tensors; it would also keep bf16 copies of trained weights during the
  pass); the text encoders and the VAE (freed after encoding / used only to decode). Per-sample scaling is
  linear (last column: batch 2 vs 2 x batch 1).
- **Library support.** The text-to-image path runs SD1.x-style `UNet2DConditionModel` pipelines; SD3-style flow
  transformers and PixArt DiTs have pipeline adapters (`models/sd3_pipeline.py`, `models/pixart.py`). SDXL's UNet
  needs `added_cond_kwargs` (pooled text + time ids), which no adapter passes: its rows are what the same recipe
  would need. No number here was measured on a GPU."""


def main(argv=None) -> int:
    from sfd_fast.models.published_configs import PUBLISHED_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Writes <out>.md and <out>.json (default docs/memory.{md,json}).")
    parser.add_argument("--models", nargs="+", default=list(PUBLISHED_MODELS), choices=list(PUBLISHED_MODELS),
                        help="published models to price (default: all)")
    parser.add_argument("--batch", type=int, default=1, help="samples per GPU for the peak columns (default 1)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8], help="FSDP world sizes (default 2 4 8)")
    parser.add_argument("--no-cfg", action="store_true",
                        help="teacher and fake score without CFG (guidance_scale 1: one UNet batch instead of two)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the 'samples that fit' table")
    parser.add_argument("--out", default=str(REPO / "docs" / "memory"), help="output path without suffix")
    args = parser.parse_args(argv)
    if args.batch < 1 or any(w < 2 for w in args.worlds):
        parser.error("--batch must be >= 1 and every --worlds entry >= 2")

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" per build
    transformers.utils.logging.set_verbosity_error()
    cfg = 1 if args.no_cfg else 2
    models = []
    for name in args.models:
        models.append(analyse(PUBLISHED_MODELS[name], MODES, tuple(args.worlds), cfg, args.batch, args.gpu_gib))
        print(f"{name}: {models[-1]['params']:,} params, {models[-1]['seconds']} s", file=sys.stderr, flush=True)
    command = "python scripts/memory_table.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                   " " + " ".join(sys.argv[1:] if argv is None else argv))
    report = {
        "command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "args": {"batch": args.batch, "worlds": args.worlds, "cfg_factor": cfg, "gpu_gib": args.gpu_gib},
        "modes": [{**{k: v for k, v in asdict(m).items() if not k.endswith("_act")},
                   "teacher_act": str(m.teacher_act).removeprefix("torch."),
                   "trained_act": str(m.trained_act).removeprefix("torch."), "per_param": m.per_param}
                  for m in MODES],
        "models": models,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

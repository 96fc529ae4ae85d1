"""LoRA mode (issue 18): fake score = teacher + a PEFT LoRA adapter, optionally G = teacher + LoRA.

The fake score f_psi is *one* network: the teacher's weights (frozen) with a LoRA adapter named
``"fake"`` injected by PEFT (``peft.inject_adapter_in_model``, what diffusers' ``add_adapter``
does). ``state.fake`` is that network with its adapter on; ``state.teacher`` is a ``BaseView`` of
the same network with the adapter off. So the base weights exist once, the fake score trains only
its LoRA matrices (Adam states for those alone), and in the generator step the teacher and the
fake score are one batched call of 2B samples (``teacher_and_fake``): rows 0..B-1 are
(x_t, cond.teacher) without the adapter, rows B..2B-1 are (x_t, cond.generator) with it.

Per-sample adapter selection is PEFT's own mixed-batch forward (``adapter_names=``, with
``"__base__"`` for "no adapter"): every PEFT LoRA layer runs its base layer on all 2B rows and
adds its LoRA delta on the fake rows only. PEFT documents ``adapter_names`` as inference-only:
``LoraModel`` refuses it while the model is in training mode. That check lives in the PeftModel
wrapper, which we do not use; at the layer level the mixed forward is plain autograd (an indexed
gather and an in-place indexed add), so gradients flow through the inputs x_t back to G. Weight
gradients are never needed from this call: in the generator step both networks are frozen
(``grads.frozen``). The fake score's own step is a plain B-row call with the adapter active.
We pass ``adapter_names`` with forward pre-hooks on the LoRA layers, as PEFT's ``LoraModel``
does (``_adapter_names_pre_forward_hook``); the row pattern is tiled when a denoiser batches more
rows than it was given (CFG's uncond/cond concatenation: [uncond rows; cond rows], same order).

With ``LoRAConfig.generator`` G is the teacher plus an adapter ``"generator"`` on its own frozen
base copy; its EMA is a plain network holding the EMA of G's *merged* weights (base + B A * s),
the same average full fine-tuning takes, so the EMA is saved, evaluated and exported as a stock
diffusers model. ``merged_generator`` gives a plain copy of G itself.

peft is optional (``pip install peft``); importing this module does not need it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAKE_ADAPTER = "fake"            # adapter name of the fake score's LoRA
GENERATOR_ADAPTER = "generator"  # adapter name of G's LoRA
BASE = "__base__"                # PEFT's adapter name for "no adapter" in a mixed batch
# ours: every residual-block convolution and every attention projection. The demo UNet has attention
# only at its lowest level, so attention-only LoRA (diffusers' SD default) leaves the fake score
# blind to most of what G changes (SPEC section 3, practical notes).
DEFAULT_TARGETS = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")
_ROWS = "_sfd_lora_rows"         # attribute on each PEFT LoRA layer: the adapter pattern of the current call


def require_peft():
    """The ``peft`` module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError("LoRA mode needs the peft library (what diffusers uses for adapters): "
                          "pip install peft  (or pip install 'sfd_fast[lora]')") from exc
    return peft


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA mode of an SFD run: which networks are teacher + LoRA, and the adapters' shape.

    The adapter starts at B = 0 and must track G from the first step: on the demo, rank 16 at the
    preset's lr_fake 3e-4 let G's forget class collapse, lr_fake 3e-3 (10x) forgets like full
    fine-tuning (docs/lora.md). The learning rates stay in ``SFDConfig`` (lr_fake, lr_gen).
    """

    rank: int = 16                          # ours (measured on the demo, docs/lora.md): LoRA rank r of every adapted layer
    alpha: float | None = None              # ours: LoRA scale alpha / r; None = r (scale 1, so lr means the same at every rank)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # ours: module names (or name suffixes, PEFT's matching) of Linear/Conv2d layers to adapt
    generator: bool = False                 # ours: G = teacher + LoRA too (else G is fully fine-tuned, as the reference)
    fused: bool = True                      # ours: teacher and fake score as one 2B call in the generator step (False: two B calls)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                    or not math.isfinite(self.alpha) or self.alpha <= 0:
                raise ValueError(f"LoRA alpha must be a finite number > 0, or None (= rank), got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"LoRA targets must be a non-empty list of module names, got {self.targets!r}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets {list(targets)} contain duplicates")
        object.__setattr__(self, "targets", targets)
        for name in ("generator", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRA {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def peft_config(self):
        """The ``peft.LoraConfig`` of one adapter (B = 0 at init: the adapted network starts as the teacher)."""
        peft = require_peft()
        return peft.LoraConfig(r=self.rank, lora_alpha=self.rank * self.scale, target_modules=list(self.targets),
                               lora_dropout=0.0, bias="none", init_lora_weights=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------- attaching adapters

def network_of(denoiser: nn.Module) -> nn.Module:
    """The diffusers model inside a denoiser (``.unet`` of EDM/DDPM/latent denoisers, else ``.network``)."""
    for name in ("unet", "network"):
        net = getattr(denoiser, name, None)
        if isinstance(net, nn.Module):
            return net
    raise TypeError(f"{type(denoiser).__name__} holds no diffusers network (.unet or .network) to put LoRA on")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's rule for a list of target_modules


def _adaptable_names(net: nn.Module) -> list[str]:
    """Short names of the Linear/Conv2d layers (last component, or the last two when it is an index)."""
    out = set()
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            parts = name.split(".")
            out.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(out)


def check_targets(net: nn.Module, targets: tuple[str, ...]) -> None:
    """ValueError unless every target names at least one layer and only Linear/Conv2d layers."""
    modules = dict(net.named_modules())
    allowed = _adaptable_names(net)
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            raise ValueError(f"LoRA target {target!r} matches no layer of the {type(net).__name__}; allowed "
                             f"(its Linear/Conv2d layers): {allowed}")
        bad = [n for n in hits if not isinstance(modules[n], (nn.Linear, nn.Conv2d))]
        if bad:
            raise ValueError(f"LoRA target {target!r} matches {bad[0]!r}, a {type(modules[bad[0]]).__name__}; LoRA "
                             f"goes on Linear/Conv2d layers only (the class embedding takes labels or vectors "
                             f"and stays the teacher's); allowed: {allowed}")


LORA_SEED_OFFSET = {FAKE_ADAPTER: 0x10A0, GENERATOR_ADAPTER: 0x10A1}  # A's init: seed + this, per adapter


def attach(denoiser: nn.Module, config: LoRAConfig, adapter: str, seed: int = 0) -> nn.Module:
    """Inject a LoRA adapter into ``denoiser``'s network in place; only the adapter is trainable.

    B starts at zero (PEFT's default init), so the adapted network starts equal to its base. A is
    PEFT's kaiming-uniform init, drawn from a generator seeded by ``seed`` (PEFT draws from torch's
    global one: two states of one seed would otherwise get different adapters); the global RNG
    state is left as it was.
    """
    require_peft()
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    net = network_of(denoiser)
    check_targets(net, config.targets)
    denoiser.requires_grad_(False)
    device = next(net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + LORA_SEED_OFFSET.get(adapter, 0))
        inject_adapter_in_model(config.peft_config(), net, adapter_name=adapter)
    for m in net.modules():
        if isinstance(m, LoraLayer):
            m.register_forward_pre_hook(_rows_pre_hook, with_kwargs=True)
    for name, p in denoiser.named_parameters():
        p.requires_grad_(f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name)
    return denoiser


def _lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def has_lora(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return any(isinstance(m, LoraLayer) for m in module.modules())


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA matrices (every adapter) of a module."""
    return [p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def base_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The non-LoRA parameters of a module, by name (the teacher's weights inside a LoRA fake score)."""
    return {n: p for n, p in module.named_parameters() if ".lora_A." not in n and ".lora_B." not in n}


def _rows_pre_hook(module: nn.Module, args, kwargs):
    """PEFT's ``_adapter_names_pre_forward_hook``, with the pattern of the current call tiled to the batch."""
    pattern = module.__dict__.get(_ROWS)
    if pattern is None:
        return None
    n = (args[0] if args else next(iter(kwargs.values()))).shape[0]
    if n % len(pattern):
        raise ValueError(f"a LoRA layer got a batch of {n} rows, not a multiple of the {len(pattern)} rows of the "
                         "adapter pattern; the denoiser must batch its inputs along dim 0 only")
    kwargs["adapter_names"] = list(pattern) * (n // len(pattern))
    return args, kwargs


@contextlib.contextmanager
def adapter_rows(module: nn.Module, pattern: tuple[str, ...]):
    """Inside: row i of every call of ``module``'s LoRA layers uses adapter ``pattern[i % len(pattern)]``."""
    layers = _lora_layers(module)
    for m in layers:
        m.__dict__[_ROWS] = pattern
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop(_ROWS, None)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode inside (the teacher never drops out), its own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _refuse_checkpointing(module: nn.Module) -> None:
    if any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
        # The recomputed forward in backward runs outside adapter_rows: it would use the adapter on every row.
        raise ValueError("LoRA mode cannot run the teacher/fake evaluation under gradient checkpointing of the "
                         "shared network (the recomputation would not know which rows are the teacher's); turn "
                         "gradient checkpointing off")


class BaseView(nn.Module):
    """The teacher f_phi of a LoRA state: the fake score's network with its adapter off.

    ``forward(x, sigma, c)`` equals the teacher's (PEFT's ``"__base__"`` rows run only the base
    layers), in eval mode. It owns no weights of its own; ``base_parameters(view)`` are the teacher's
    weights (``view.parameters()`` also lists the shared LoRA matrices).
    """

    def __init__(self, shared: nn.Module):
        super().__init__()
        self.shared = shared

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        _refuse_checkpointing(self.shared)
        with adapter_rows(self.shared, (BASE,)), eval_mode(self.shared):
            return self.shared(x, sigma, c)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("shared"), name)  # num_classes, image_shape, kind, ...


def teacher_and_fake(fake: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, c_teacher: torch.Tensor,
                     c_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher(x_t, sigma, c_teacher), fake(x_t, sigma, c_fake)) as ONE call of 2B rows.

    ``fake``: the LoRA fake score (``state.fake``). x_t (B, C, H, W); sigma (B,) or a scalar;
    c_teacher, c_fake (B,) labels or (B, ...) embeddings. Both halves run in eval mode (in the
    generator step the fake score scores without dropout, as in both reference codes with dropout).
    """
    _refuse_checkpointing(fake)
    n = x_t.shape[0]
    sigma = torch.as_tensor(sigma, device=x_t.device)
    sigma = sigma.expand(n) if sigma.dim() == 0 else sigma.reshape(n)
    with adapter_rows(fake, (BASE,) * n + (FAKE_ADAPTER,) * n), eval_mode(fake):
        y = fake(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([c_teacher, c_fake]))
    return y[:n], y[n:]


# --------------------------------------------------------------------------- merged weights, EMA, saving

def _merged_named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA module's effective weights (base + B A * s) named as in the plain module; other params as they are."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}
    for name, p in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        plain = name.replace(".base_layer.", ".")
        owner, _, leaf = plain.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "weight":
            w = p.detach()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    w = w + layer.get_delta_weight(adapter).to(w.dtype)
            out[plain] = w
        else:
            out[plain] = p.detach()
    return out


@torch.no_grad()
def update_merged_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * merged(model): the EMA of a LoRA G's effective weights.

    ``ema`` is the plain network (no LoRA layers); buffers are copied, as in ``ema.update_ema``.
    """
    merged = _merged_named_tensors(model)
    names = [n for n, _ in ema.named_parameters()]
    missing = [n for n in names if n not in merged]
    if missing:
        raise ValueError(f"the EMA's parameters {missing[:3]} have no counterpart in the LoRA generator")
    torch._foreach_lerp_([p for _, p in ema.named_parameters()], [merged[n] for n in names], 1.0 - beta)
    buffers = {n.replace(".base_layer.", "."): b for n, b in model.named_buffers()}
    for n, b in ema.named_buffers():
        if n in buffers:
            b.copy_(buffers[n])


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every LoRA layer merged into its base layer and removed (a stock module)."""
    require_peft()
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, m.get_base_layer())
    for net in out.modules():
        if "peft_config" in net.__dict__:
            del net.__dict__["peft_config"]
    return out  # the row hooks sat on the LoRA layers, which are gone


def merged_generator(generator: nn.Module) -> nn.Module:
    """A LoRA G as a plain ``OneStepGenerator`` (merged weights): ``save_generator`` writes a stock folder."""
    return merged_copy(generator) if has_lora(generator) else generator


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names (PeftModel.save_pretrained)
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(denoiser: nn.Module, adapter: str, path: str | os.PathLike) -> Path:
    """One adapter as a PEFT adapter folder: ``adapter_model.safetensors`` + ``adapter_config.json``.

    Keys are those ``PeftModel.save_pretrained`` writes for the bare diffusers network
    (``base_model.model.<module>.lora_A.weight``), so ``PeftModel.from_pretrained(unet, path)``
    loads it onto a copy of the teacher's network.
    """
    require_peft()
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    net = network_of(denoiser)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = get_peft_model_state_dict(net, adapter_name=adapter)
    save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in sd.items()}, path / ADAPTER_WEIGHTS)
    net.peft_config[adapter].save_pretrained(str(path))
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    meta["base_model_name_or_path"] = meta.get("base_model_name_or_path") or f"the teacher's {type(net).__name__}"
    (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def save_adapters(state, path: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """The state's adapters as PEFT folders ``path/fake`` (and ``path/generator`` with a LoRA G).

    Written to a temp folder and moved onto ``path`` (``io.atomic.replace_dir``: never half-written,
    never over a folder this library did not write unless ``overwrite``); ``path/sfd_fast.json``
    marks it as ours and records the LoRA config.
    """
    from ..io.atomic import OWN_FOLDER_MARKER, replace_dir, staging_dir, write_json

    if getattr(state, "lora", None) is None:
        raise ValueError("this state has no LoRA adapters (created without lora=LoRAConfig(...))")
    path = Path(path)
    tmp = staging_dir(path)
    try:
        save_adapter(state.fake, FAKE_ADAPTER, tmp / FAKE_ADAPTER)
        if state.lora.generator:
            save_adapter(state.generator.denoiser, GENERATOR_ADAPTER, tmp / GENERATOR_ADAPTER)
        write_json({"kind": "lora-adapters", "lora": state.lora.to_dict()}, tmp / OWN_FOLDER_MARKER)
        replace_dir(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    names = (FAKE_ADAPTER, GENERATOR_ADAPTER) if state.lora.generator else (FAKE_ADAPTER,)
    return {name: path / name for name in names}


def state_bytes(state) -> dict[str, int]:
    """Exact bytes a state holds in tensors: weights and buffers (shared storage counted once), gradients,
    optimizer states. Excludes activations and the caller's own teacher object."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen or t.numel() == 0:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return total

    nets = (state.teacher, state.fake, state.generator, state.generator_ema)
    weights = count(t for net in nets for t in (*net.parameters(), *net.buffers()))
    grads = count(p.grad for net in nets for p in net.parameters())
    opt = count(v for o in (state.opt_fake, state.opt_gen) for s in o.state.values() for v in s.values())
    trainable = sum(p.numel() for o in (state.opt_fake, state.opt_gen) for g in o.param_groups for p in g["params"])
    return {"weights_and_buffers": weights, "gradients": grads, "optimizer_states": opt,
            "total": weights + grads + opt, "trainable_parameters": trainable}


__all__ = ["LoRAConfig", "DEFAULT_TARGETS", "BaseView", "attach", "teacher_and_fake", "update_merged_ema",
           "merged_copy", "merged_generator", "save_adapter", "save_adapters", "state_bytes", "lora_parameters",
           "base_parameters", "require_peft"]

"""Did the text-to-image generator forget? CLIP-scored metrics (SPEC section 5, for prompts).

A local CLIP model (any transformers ``CLIPModel`` folder with its tokenizer, safetensors; e.g.
openai/clip-vit-large-patch14 written once with ``save_pretrained``) plays the evaluation
classifier. With cos(image, text) the cosine of CLIP's projected embeddings:
- ``override_rate``: share of images generated from a forget prompt f that are closer to its
  override o than to f (the class path's override rate, CLIP deciding between the two texts);
- ``forget_clip_score`` / ``override_clip_score``: 100 x mean cos with f / with o;
- ``remain_clip_score``: 100 x mean cos of remain-prompt images with their own prompt;
- ``retention_clip_distance``: mean 1 - cos(CLIP image embeddings) between the generator's and
  the teacher's remain-prompt images from the same noise (SPEC section 4, CLIP image features
  instead of a perceptual network; 0 = identical).
Every score is reported for the generator (1 NFE) and for the teacher's Heun sampler beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.sampler import heun_nfe, heun_sample

# CLIP's image normalisation (OpenAI); a folder's preprocessor_config.json overrides it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected embedding; 5 returns an output whose pooler_output it is."""
    return output if torch.is_tensor(output) else output.pooler_output


class ClipJudge:
    """Cosine similarities between images in [-1, 1] and texts, from a local CLIP folder."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{str(self.path)!r} is not a CLIP model folder (no config.json); save one "
                                    "with CLIPModel.save_pretrained(...) and its tokenizer's save_pretrained")
        self.model = CLIPModel.from_pretrained(self.path, use_safetensors=True, local_files_only=True)
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.path, local_files_only=True)
        pre_file = self.path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        self.mean = torch.tensor(pre.get("image_mean", CLIP_MEAN), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", CLIP_STD), device=device).view(1, 3, 1, 1)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.device = torch.device(device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit CLIP embeddings (N, E) of images (N, 3, H, W) in [-1, 1] (square: resized, no crop)."""
        x = (images.to(self.device).float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        return F.normalize(_features(self.model.get_image_features(pixel_values=(x - self.mean) / self.std)), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return F.normalize(_features(self.model.get_text_features(**ids)), dim=-1)


def override_rate(sim_forget: torch.Tensor, sim_override: torch.Tensor) -> float:
    """Share of images (N,) closer to the override text than to the forget text."""
    return float((sim_override > sim_forget).float().mean())


@torch.no_grad()
def _images(sample, pipeline, prompts: list[str], per_prompt: int, latent_shape, seed: int,
            batch_size: int) -> torch.Tensor:
    """Images (len(prompts) * per_prompt, 3, H, W): prompt-major, noise k of every prompt seeded alike."""
    device = pipeline.device
    noise = torch.randn((per_prompt, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    rows = [(p, k) for p in prompts for k in range(per_prompt)]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        emb = pipeline.encode_prompts([p for p, _ in chunk]).to(device)
        z = noise[torch.tensor([k for _, k in chunk], device=device)]
        out.append(pipeline.decode(sample(z, emb)).cpu())
    return torch.cat(out)


def evaluate_t2i(generator: nn.Module, teacher: nn.Module, pipeline, judge: ClipJudge, forget: list[str],
                 override: list[str], remain: list[str], *, per_prompt: int = 4, teacher_steps: int = 25,
                 seed: int = 0, batch_size: int = 16) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metrics, images) for a one-step text-to-image generator and its teacher (LatentDenoisers).

    ``forget[i]`` is paired with ``override[i]``. images: {"generator"|"teacher": (forget rows then
    remain rows) (N, 3, H, W)} for grids. The teacher samples with EDM Heun over the sigma range of
    its DDPM schedule, with its own CFG scale and negative prompt.
    """
    if len(forget) != len(override) or not forget or not remain:
        raise ValueError(f"need paired forget/override prompts and remain prompts, got {len(forget)} forget, "
                         f"{len(override)} override, {len(remain)} remain")
    if per_prompt < 1 or teacher_steps < 1:
        raise ValueError(f"per_prompt and teacher_steps must be >= 1, got {per_prompt} and {teacher_steps}")
    sigmas = teacher.log_sigmas.exp()
    samplers = {
        "generator": lambda z, c: generator(z, c),
        "teacher": lambda z, c: heun_sample(teacher, z, c, teacher_steps, float(sigmas[0]), float(sigmas[-1])),
    }
    text_f, text_o, text_r = (judge.text_embeddings(t) for t in (forget, override, remain))
    rep = torch.arange(len(forget)).repeat_interleave(per_prompt)
    rep_r = torch.arange(len(remain)).repeat_interleave(per_prompt)
    metrics: dict = {"clip_model": str(judge.path), "per_prompt": per_prompt, "forget_prompts": len(forget),
                     "remain_prompts": len(remain), "seed": seed,
                     "nfe": {"generator": 1, "teacher": heun_nfe(teacher_steps)},
                     "cfg_doubles_unet_calls": {"generator": generator.denoiser.guidance_scale != 1,
                                                "teacher": teacher.guidance_scale != 1}}
    images, remain_embeddings = {}, {}
    for name, sample in samplers.items():
        imgs_f = _images(sample, pipeline, forget, per_prompt, teacher.image_shape, seed, batch_size)
        imgs_r = _images(sample, pipeline, remain, per_prompt, teacher.image_shape, seed + 1, batch_size)
        emb_f, emb_r = judge.image_embeddings(imgs_f), judge.image_embeddings(imgs_r)
        sim_f = (emb_f * text_f[rep].to(emb_f.device)).sum(-1)
        sim_o = (emb_f * text_o[rep].to(emb_f.device)).sum(-1)
        sim_r = (emb_r * text_r[rep_r].to(emb_r.device)).sum(-1)
        metrics[name] = {"override_rate": override_rate(sim_f, sim_o),
                         "forget_clip_score": 100 * float(sim_f.mean()),
                         "override_clip_score": 100 * float(sim_o.mean()),
                         "remain_clip_score": 100 * float(sim_r.mean()),
                         "override_rate_per_forget_prompt": [override_rate(a, b) for a, b in
                                                             zip(sim_f.split(per_prompt), sim_o.split(per_prompt))]}
        images[name] = torch.cat([imgs_f, imgs_r])
        remain_embeddings[name] = emb_r
    metrics["retention_clip_distance"] = float(
        (1 - (remain_embeddings["generator"] * remain_embeddings["teacher"]).sum(-1)).mean())
    return metrics, images


__all__ = ["ClipJudge", "evaluate_t2i", "override_rate", "CLIP_MEAN", "CLIP_STD"]

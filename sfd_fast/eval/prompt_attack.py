"""Soft-prompt attack on a text-to-image one-step generator (AdvUnlearn's inner attack, SPEC 4-5).

k learnable token embeddings ("soft tokens") are inserted into the forget prompt just before its
end-of-text token, inside the text encoder's input space (a forward hook on its token-embedding
layer swaps them in, so any CLIP text model works). They are trained with Adam to make the
unlearned generator reproduce what the original model draws for the forget prompt:
  min_delta  mean_z || G(z, enc(f + delta)) - T(z, f) ||^2,
T = the teacher's Heun sampler from the same noise (AdvUnlearn regresses on the original model's
output in the same way). The judge never enters the objective; attack success is then scored by
the CLIP judge: ASR = share of images closer to the forget text than to its override text, on
held-out noise, before (plain prompt) and after (prompt + learned soft tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.grads import frozen
from ..models.sampler import heun_sample


class SoftPrompt:
    """A prompt with ``tokens`` learnable input embeddings (``delta``) before its end-of-text token."""

    def __init__(self, pipeline, prompt: str, tokens: int):
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        tok = pipeline.tokenizer
        length = tok.model_max_length
        ids = tok([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids[0]
        eos = int((ids == tok.eos_token_id).nonzero()[0])  # the first one (pad may equal eos)
        if eos + tokens >= length:
            raise ValueError(f"prompt {prompt!r} uses {eos + 1} of {length} tokens: no room for {tokens} soft "
                             f"tokens; shorten it or use fewer tokens")
        # Placeholders repeat the last prompt token; their embeddings are replaced by delta.
        self.ids = torch.cat([ids[:eos], ids[eos - 1].repeat(tokens), ids[eos:]])[:length]
        self.positions = torch.arange(eos, eos + tokens)
        self.encoder = pipeline.text_encoder
        table = self.encoder.get_input_embeddings()
        self.delta = table.weight[self.ids[self.positions]].detach().clone().float().requires_grad_(True)

    def _swap(self, module, inputs, output):
        output = output.clone()
        output[:, self.positions] = self.delta.to(output.dtype)
        return output

    def embeddings(self) -> torch.Tensor:
        """The prompt's text embedding (1, L, D), differentiable in ``delta``."""
        device = next(self.encoder.parameters()).device
        handle = self.encoder.get_input_embeddings().register_forward_hook(self._swap)
        try:
            return self.encoder(self.ids[None].to(device))[0].float()
        finally:
            handle.remove()


def attack_success_rate(images: torch.Tensor, judge, forget: str, override: str) -> float:
    """Share of images the CLIP judge places closer to ``forget`` than to ``override``."""
    texts = judge.text_embeddings([forget, override])
    sims = judge.image_embeddings(images) @ texts.T
    return float((sims[:, 0] > sims[:, 1]).float().mean())


def soft_prompt_attack(generator: nn.Module, teacher: nn.Module, pipeline, judge, forget: str, override: str, *,
                       tokens: int = 4, steps: int = 30, lr: float = 1e-2, train_noises: int = 4,
                       eval_noises: int = 8, teacher_steps: int = 10, seed: int = 0) -> dict:
    """Attack ``generator`` on one forget prompt; ASR before/after on held-out noise, and the losses."""
    if steps < 1 or train_noises < 1 or eval_noises < 1:
        raise ValueError(f"steps, train_noises and eval_noises must be >= 1, got {steps}, {train_noises}, "
                         f"{eval_noises}")
    device = pipeline.device
    rng = torch.Generator().manual_seed(seed)
    shape = teacher.image_shape
    z_train = torch.randn((train_noises, *shape), generator=rng).to(device)
    z_eval = torch.randn((eval_noises, *shape), generator=rng).to(device)
    plain = pipeline.encode_prompts([forget]).to(device)
    sigmas = teacher.log_sigmas.exp()
    with torch.no_grad():
        target = heun_sample(teacher, z_train, plain.expand(train_noises, -1, -1), teacher_steps,
                             float(sigmas[0]), float(sigmas[-1]))
    soft = SoftPrompt(pipeline, forget, tokens)
    opt = torch.optim.Adam([soft.delta], lr=lr)

    def attack_loss():
        return (generator(z_train, soft.embeddings().expand(train_noises, -1, -1)) - target).square().mean()

    with frozen(generator):
        for step in range(steps):
            loss = attack_loss()
            if step == 0:
                loss_before = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            loss_after = float(attack_loss())
            before = pipeline.decode(generator(z_eval, plain.expand(eval_noises, -1, -1)))
            after = pipeline.decode(generator(z_eval, soft.embeddings().expand(eval_noises, -1, -1)))
    return {"forget": forget, "override": override, "tokens": tokens, "steps": steps, "lr": lr,
            "asr_before": attack_success_rate(before, judge, forget, override),
            "asr_after": attack_success_rate(after, judge, forget, override),
            "loss_before": loss_before, "loss_after": loss_after, "eval_noises": eval_noises}


__all__ = ["SoftPrompt", "soft_prompt_attack", "attack_success_rate"]

"""A teacher's sample quality on the embedded digits: FID (independent LeNet and classifier features)
on all classes against the held-out digits, per-class feature variance, classifier accuracy.

    OMP_NUM_THREADS=1 python scripts/teacher_quality.py --teacher sfd_fast/assets/teacher --out t.json

Used to check that adding a null label (pretrain-teacher --label-dropout or --null-row-only) kept
the teacher's quality (issue 15); --guidance W also samples it with classifier-free guidance. Also
the held-out EDM denoising loss with the true label, with the null label (if any) and with the mean
of the class-conditional outputs (ESD's stand-in for the null on a teacher without one): how good
the unconditional score is.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from sfd_fast.core.forget import ForgetSpec
from sfd_fast.core.losses import edm_denoising_loss, edm_loss_weight, edm_training_sigma
from sfd_fast.eval.classifier import CLASSIFIER_FILE, DigitClassifier
from sfd_fast.eval.fid import ClassifierFeatures
from sfd_fast.eval.fid_network import independent_features
from sfd_fast.eval.metrics import unlearning_metrics
from sfd_fast.eval.quality import quality_metrics
from sfd_fast.io.atomic import write_json
from sfd_fast.io.data import load_embedded_mnist
from sfd_fast.models.networks import load_denoiser
from sfd_fast.models.sampler import GuidedDenoiser, edm_heun_sample


@torch.no_grad()
def held_out_denoising_loss(teacher, images: torch.Tensor, labels: torch.Tensor, *, draws: int = 2,
                            batch: int = 500, seed: int = 0) -> dict[str, float]:
    """Mean EDM-weighted denoising loss per image on held-out digits, sigma ~ the training distribution."""
    gen = torch.Generator().manual_seed(seed)
    totals = {"true_label": 0.0, "mean_of_classes": 0.0, "null_label": 0.0}
    count = 0
    for _ in range(draws):
        for x0, c in zip(images.split(batch), labels.split(batch)):
            sigma = edm_training_sigma(len(x0), -1.2, 1.2, generator=gen)
            noisy = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
            weight = edm_loss_weight(sigma, teacher.sigma_data)

            def loss(denoised):
                return float(edm_denoising_loss(denoised, x0, weight)[0])

            totals["true_label"] += loss(teacher(noisy, sigma, c))
            totals["mean_of_classes"] += loss(torch.stack([teacher(noisy, sigma, torch.full_like(c, k))
                                                           for k in range(teacher.num_classes)]).mean(0))
            if teacher.null_label is not None:
                totals["null_label"] += loss(teacher(noisy, sigma, torch.full_like(c, teacher.null_label)))
            count += len(x0)
    if teacher.null_label is None:
        del totals["null_label"]
    return {k: v / count for k, v in totals.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="teacher folder")
    p.add_argument("--out", type=Path, required=True, help="output JSON file")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (default: 18, 35 NFE)")
    p.add_argument("--per-class", type=int, default=100, help="samples per class (default: 100)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (needs a null label; default: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_denoiser(args.teacher)
    denoiser = teacher if args.guidance is None else GuidedDenoiser(teacher, args.guidance)
    sampler = functools.partial(edm_heun_sample, denoiser, num_steps=args.steps)
    classifier = DigitClassifier.load(CLASSIFIER_FILE)
    # "forget" class 0 only splits the classes for the metric helpers; nothing is forgotten here.
    spec = ForgetSpec(teacher.num_classes, (0,), (1,))
    images, labels = load_embedded_mnist("test", teacher.image_shape[-1])
    spaces = {"independent": independent_features(), "classifier": ClassifierFeatures(classifier)}
    row = {"teacher": str(args.teacher), "null_label": teacher.null_label, "guidance": args.guidance,
           "heun_steps": args.steps, "per_class": args.per_class, "threads": torch.get_num_threads(),
           "fid_classes": "1..9 (class 0's samples give forget_variance)"}
    row.update(quality_metrics(sampler, spec, teacher.image_shape, spaces, images, labels, per_class=args.per_class))
    accuracy = unlearning_metrics(sampler, classifier, spec, teacher.image_shape, per_class=args.per_class, seed=100)
    row["accuracy_class_0"] = accuracy["forget_accuracy"]
    row["accuracy_classes_1_9"] = accuracy["remain_accuracy"]
    row["held_out_denoising_loss"] = held_out_denoising_loss(teacher, images, labels)
    write_json(row, args.out)
    print({k: (round(v["fid"], 3) if isinstance(v, dict) and "fid" in v else v) for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

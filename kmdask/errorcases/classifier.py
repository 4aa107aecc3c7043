"""The general classifier of the error-case experiment: a small numpy MLP, deterministic.

Why our own network rather than scikit-learn's ``MLPClassifier`` (see the README section "Error
cases and specialists" for the measurements): it trains in float32 (sklearn's MLP on float64
input is about half the speed), it sees freshly shifted images every epoch (sklearn has no
augmentation hook), its learning rate follows a cosine schedule that can be restarted for
fine-tuning (the specialists and the matched-budget baseline start from its weights), and it adds
no runtime dependency. Weights are plain arrays in an ``.npz`` (never a pickle).

The network: ``784 -> hidden... -> 10``, ReLU, softmax cross-entropy, SGD with momentum and
weight decay, minibatches in a seeded order; every epoch each image is shifted by a random
integer offset of up to ``shift`` pixels (zero fill). Given a seed the weights are bit-identical
from run to run on one machine (float32 GEMMs in a fixed order).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmdask.errorcases.spec import ClassifierSpec
from kmdask.errors import DataError

SIDE = 28
N_CLASSES = 10
MEAN, STD = 0.1307, 0.3081  # MNIST pixel mean/std: inputs are standardised with them
#: uint8 pixel -> standardised float32 input
LUT = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(MEAN))
       / np.float32(STD)).astype(np.float32)


@dataclass
class Network:
    """An MLP's parameters: ``weights = [W0, b0, W1, b1, ...]`` (float32)."""

    weights: list[np.ndarray]

    @property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(zip(self.weights[0::2], self.weights[1::2], strict=True))

    def copy(self) -> Network:
        return Network([w.copy() for w in self.weights])

    def logits(self, images: np.ndarray, block: int = 8192) -> np.ndarray:
        """(n, 10) float32 logits of uint8 image rows."""
        out = np.empty((images.shape[0], N_CLASSES), dtype=np.float32)
        for s in range(0, images.shape[0], block):
            h = LUT[np.asarray(images[s : s + block])]
            for i, (w, b) in enumerate(self.layers):
                h = h @ w
                h += b
                if i < len(self.weights) // 2 - 1:
                    np.maximum(h, 0, out=h)
            out[s : s + block] = h
        return out

    def proba(self, images: np.ndarray) -> np.ndarray:
        """(n, 10) float64 class probabilities (softmax taken in float64 so that top
        probabilities near 1, where the zero-out thresholds sit, keep their resolution)."""
        return softmax(self.logits(images).astype(np.float64))

    def save(self, path: Path) -> None:
        np.savez(path, **{f"w{i}": w for i, w in enumerate(self.weights)})

    @classmethod
    def load(cls, path: Path) -> Network:
        try:
            with np.load(path, allow_pickle=False) as z:
                n = len(z.files)
                return cls([z[f"w{i}"].copy() for i in range(n)])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{path}: unreadable network weights ({exc})") from None


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(net: Network, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(net.logits(images), axis=1) == labels))


def init_network(hidden: tuple[int, ...], rng: np.random.Generator) -> Network:
    """He-initialised weights, zero biases."""
    sizes = [SIDE * SIDE, *hidden, N_CLASSES]
    weights = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        weights.append((rng.standard_normal((a, b)) * math.sqrt(2.0 / a)).astype(np.float32))
        weights.append(np.zeros(b, dtype=np.float32))
    return Network(weights)


def shifted(padded: np.ndarray, idx: np.ndarray, shift: int, rng: np.random.Generator
            ) -> np.ndarray:
    """Rows ``idx`` of zero-padded 28x28 images, each cut at a random offset in
    [-shift, shift]^2: (len(idx), 784) uint8."""
    n = idx.shape[0]
    if shift == 0:
        return padded[idx].reshape(n, -1)
    dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
    ar = np.arange(SIDE)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    return padded[idx[:, None, None], rows, cols].reshape(n, -1)


def train(images: np.ndarray, labels: np.ndarray, spec: ClassifierSpec, *,
          init: Network | None = None, examples: int | None = None,
          learning_rate: float | None = None, seed: int | None = None,
          progress: Callable[[dict], None] | None = None) -> tuple[Network, dict]:
    """Train (or, from ``init``, fine-tune) a network on uint8 rows.

    Parameters
    ----------
    images, labels : (n, 784) uint8 and (n,) int
        Training rows; repeat a row to weight it.
    spec : ClassifierSpec
        Architecture, batch, momentum, weight decay, shift augmentation, epochs, seed.
    init : Network, optional
        Start from these weights (fine-tuning) instead of a fresh He initialisation.
    examples : int, optional
        Train on this many examples (minibatch rows) instead of ``spec.epochs`` passes; the
        matched-budget baseline uses it.
    learning_rate, seed : optional
        Override the spec's (fine-tuning restarts the cosine schedule at a lower rate).

    Returns
    -------
    (Network, history): history holds ``seconds``, ``examples``, ``epoch_loss``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(spec.seed if seed is None else seed)
    net = init.copy() if init is not None else init_network(spec.hidden, rng)
    lr0 = spec.learning_rate if learning_rate is None else learning_rate
    n = images.shape[0]
    y = np.asarray(labels, dtype=np.int64)
    s = spec.shift
    padded = np.pad(np.asarray(images, dtype=np.uint8).reshape(n, SIDE, SIDE),
                    ((0, 0), (s, s), (s, s)))
    total = max(1, examples if examples is not None else spec.epochs * n)
    velocity = [np.zeros_like(w) for w in net.weights]
    losses: list[float] = []
    seen, loss_sum, loss_n = 0, 0.0, 0
    while seen < total:
        order = rng.permutation(n)
        for start in range(0, n, spec.batch):
            if seen >= total:
                break
            idx = order[start : start + min(spec.batch, total - seen)]  # exactly `total`
            x = LUT[shifted(padded, idx, s, rng)]
            lr = lr0 * 0.5 * (1.0 + math.cos(math.pi * seen / total))
            loss_sum += _sgd_step(net, velocity, x, y[idx], lr, spec) * idx.shape[0]
            loss_n += idx.shape[0]
            seen += idx.shape[0]
        losses.append(loss_sum / max(loss_n, 1))
        loss_sum, loss_n = 0.0, 0
        if progress is not None:
            progress({"epoch": len(losses), "loss": losses[-1], "examples": seen,
                      "seconds": time.perf_counter() - t0})
    return net, {"seconds": time.perf_counter() - t0, "examples": seen, "epoch_loss": losses}


def _sgd_step(net: Network, velocity: list[np.ndarray], x: np.ndarray, y: np.ndarray,
              lr: float, spec: ClassifierSpec) -> float:
    """One minibatch: forward, softmax cross-entropy, backward, momentum update; its loss."""
    acts = [x]
    h = x
    layers = net.layers
    for w, b in layers[:-1]:
        h = h @ w
        h += b
        np.maximum(h, 0, out=h)
        acts.append(h)
    z = h @ layers[-1][0]
    z += layers[-1][1]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(y.shape[0])
    loss = float(-np.mean(np.log(np.maximum(p[rows, y], 1e-30))))
    g = p
    g[rows, y] -= 1.0
    g /= np.float32(y.shape[0])
    lr32, mu, wd = np.float32(lr), np.float32(spec.momentum), np.float32(spec.weight_decay)
    for li in range(len(layers) - 1, -1, -1):
        w, b = layers[li]
        dw = acts[li].T @ g
        db = g.sum(axis=0)
        if li:
            g = g @ w.T
            g *= acts[li] > 0
        dw += wd * w
        vw, vb = velocity[2 * li], velocity[2 * li + 1]
        vw *= mu
        vw += dw
        vb *= mu
        vb += db
        w -= lr32 * vw
        b -= lr32 * vb
    return loss


def write_model(dest: Path, net: Network, info: dict) -> None:
    """``weights.npz`` + ``classifier.json`` into ``dest`` (a fresh directory)."""
    dest.mkdir(parents=True, exist_ok=True)
    net.save(dest / "weights.npz")
    (dest / "classifier.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_model(src: Path) -> tuple[Network, dict]:
    try:
        info = json.loads((src / "classifier.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{src / 'classifier.json'}: unreadable ({exc})") from None
    return Network.load(src / "weights.npz"), info

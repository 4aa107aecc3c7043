"""Augmented copies of a training set: shifted (±2 px) and rotated (±10°) images.

``augment=N`` at staging appends N warped copies of the training set, made chunk by chunk so
memory stays bounded by a few chunks whatever N is. The draws for source rows
``[b*10000, (b+1)*10000)`` of copy ``c`` come from ``keyed_rng(seed, c, b)``, so the augmented
data does not depend on the chunking. 28 x 28 images only (the warp is compiled for them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from kmdask.data.idx import IMAGE_SIDE
from kmdask.rng import keyed_rng

AUG_BLOCK = 10_000  # source rows per keyed random stream
AUG_MAX_SHIFT = 2.0  # pixels
AUG_MAX_ROTATE = 10.0  # degrees
AUG_METHOD = "shift-rotate-bilinear/1"  # bump when the warp changes: stores are then restaged
N_FEATURES = IMAGE_SIDE * IMAGE_SIDE



def augment_params(copies: int, seed: int) -> dict[str, Any]:
    """The augment attributes recorded in (and compared against) a store."""
    if copies == 0:
        return {"copies": 0}
    return {"copies": copies, "seed": seed, "method": AUG_METHOD, "block_rows": AUG_BLOCK,
            "max_shift_px": AUG_MAX_SHIFT, "max_rotate_deg": AUG_MAX_ROTATE}


def augment_draws(seed: int, copy: int, block: int) -> tuple[np.ndarray, ...]:
    """(dx, dy, theta in radians) for the AUG_BLOCK source rows of ``block`` in ``copy``."""
    u = keyed_rng(seed, copy, block).uniform(-1.0, 1.0, size=(3, AUG_BLOCK))
    return u[0] * AUG_MAX_SHIFT, u[1] * AUG_MAX_SHIFT, np.deg2rad(u[2] * AUG_MAX_ROTATE)


_PAD = IMAGE_SIDE + 2  # one pixel of zero padding on each side: out-of-range taps read 0


@njit(cache=True, nogil=True)
def _warp(images, cos, sin, dx, dy, out):  # pragma: no cover - compiled
    # Every step in float32, in the order of the vectorised numpy form this replaced (the
    # augmented stores are bit-identical to it; tests/test_staging.py checks on real MNIST).
    # Two loops per image: the coordinates (no image reads, so it runs in SIMD lanes), then
    # the four taps and the blend.
    half = (IMAGE_SIDE - 1) / 2.0
    c = np.float32(half)
    lo = np.float32(-1.0)
    hi = np.float32(IMAGE_SIDE)
    s, p, npx = IMAGE_SIDE, _PAD, IMAGE_SIDE * IMAGE_SIDE
    pad = np.zeros(p * p, np.float32)
    u = np.empty(npx, np.float32)
    v = np.empty(npx, np.float32)
    for gy in range(s):
        for gx in range(s):
            u[gy * s + gx] = np.float32(gx - half)
            v[gy * s + gx] = np.float32(gy - half)
    fxs = np.empty(npx, np.float32)
    fys = np.empty(npx, np.float32)
    i00 = np.empty(npx, np.int32)
    sxs = np.empty(npx, np.int32)
    sys_ = np.empty(npx, np.int32)
    for r in range(images.shape[0]):
        for yy in range(s):
            for xx in range(s):
                pad[(yy + 1) * p + xx + 1] = np.float32(images[r, yy * s + xx])
        cr, sr, dxr, dyr = cos[r], sin[r], dx[r], dy[r]
        for q in range(npx):
            qx = u[q] - dxr
            qy = v[q] - dyr
            # inverse map: output pixel -> source coordinates
            px = (cr * qx + sr * qy) + c
            py = (cr * qy - sr * qx) + c
            x0 = np.floor(px)
            y0 = np.floor(py)
            fxs[q] = px - x0
            fys[q] = py - y0
            xi = np.int32(min(max(x0, lo), hi)) + 1  # padded column of the left tap
            yi = np.int32(min(max(y0, lo), hi)) + 1
            sxs[q] = min(xi + 1, p - 1) - xi  # 0 when clamped: both taps in the zero border
            sys_[q] = (min(yi + 1, p - 1) - yi) * p
            i00[q] = yi * p + xi
        for q in range(npx):
            k, sx, sy, fx, fy = i00[q], sxs[q], sys_[q], fxs[q], fys[q]
            a, b = pad[k], pad[k + sx]
            cc, d = pad[k + sy], pad[k + sy + sx]
            top = a + fx * (b - a)
            o = np.rint(top + fy * (cc + fx * (d - cc) - top))
            out[r, q] = np.uint8(min(max(o, np.float32(0.0)), np.float32(255.0)))


def warp_images(images: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                theta: np.ndarray) -> np.ndarray:
    """Rotate each (n, 784) uint8 image by ``theta`` about its centre, then shift it by
    (``dx``, ``dy``) pixels; bilinear interpolation in float32, zeros outside."""
    out = np.empty((images.shape[0], N_FEATURES), np.uint8)
    _warp(np.ascontiguousarray(images), np.cos(theta).astype(np.float32),
          np.sin(theta).astype(np.float32), dx.astype(np.float32), dy.astype(np.float32), out)
    return out


def train_rows(images: np.ndarray, labels: np.ndarray, start: int, stop: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of the augmented training set (originals first, then copies)."""
    n = images.shape[0]
    out = np.empty((stop - start, images.shape[1]), np.uint8)
    r = start
    while r < stop:
        copy, src = divmod(r, n)
        if copy == 0:
            end = min(stop, n)
            out[r - start:end - start] = images[src:src + end - r]
        else:
            block = src // AUG_BLOCK
            end = min(stop, copy * n + min(n, (block + 1) * AUG_BLOCK))
            s0 = r - copy * n
            off = s0 - block * AUG_BLOCK
            dx, dy, th = (v[off:off + end - r] for v in augment_draws(seed, copy, block))
            out[r - start:end - start] = warp_images(images[s0:s0 + end - r], dx, dy, th)
        r = end
    return out, labels[np.arange(start, stop) % n]

"""Per-example 3D transforms for Grain: top-level, picklable classes over numpy.

Random transforms implement ``random_map(element, rng)`` (``grain.transforms.RandomMap``): Grain
seeds ``rng`` from the dataset seed and the element's index, so the output is a pure function
of (seed, index): deterministic, and exact after an iterator-state restore.

Volumes are ``(X, Y, Z, C)`` float32 in RAS voxel order (channels last, as the ViT expects).
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from scipy import ndimage


def _resize(vol: np.ndarray, size) -> np.ndarray:
    """Trilinear resize of ``(X, Y, Z, C)`` to ``size`` spatial voxels."""
    if tuple(vol.shape[:3]) == tuple(size):
        return vol
    zoom = [t / s for t, s in zip(size, vol.shape[:3])] + [1.0]
    out = ndimage.zoom(vol, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    return out[: size[0], : size[1], : size[2]]


def _pad_to(vol: np.ndarray, min_shape) -> np.ndarray:
    pads = [(0, max(0, m - s)) for s, m in zip(vol.shape[:3], min_shape)] + [(0, 0)] * (vol.ndim - 3)
    return np.pad(vol, pads) if any(p[1] for p in pads) else vol


@dataclasses.dataclass
class Decode(grain.transforms.Map):
    """TFDS record -> ``{"image": (X, Y, Z, 1) float32, "label", metadata}``; bytes -> str."""

    keep_label: bool = False

    def map(self, ex):
        out = {"image": np.asarray(ex["volume"], np.float32)[..., None]}
        if self.keep_label:
            out["label"] = np.asarray(ex["label"], np.uint8)
        for k in ("series_id", "study_id", "patient_id", "sequence", "body_region", "sex", "findings", "report"):
            if k in ex:
                v = ex[k]
                out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        if "age" in ex:
            out["age"] = np.float32(ex["age"])
        return out


def random_crop_box(rng: np.random.Generator, shape, scale, log_ratio=(math.log(3 / 4), math.log(4 / 3))):
    """A 3D random-resized-crop box: volume fraction in ``scale``, log-uniform aspect ratios."""
    total = float(np.prod(shape))
    for _ in range(10):
        frac = rng.uniform(*scale)
        r = np.exp(rng.uniform(*log_ratio, size=3))
        r = r / np.cbrt(np.prod(r))  # unit product: only the shape changes
        side = np.cbrt(frac * total) * r
        size = np.minimum(np.maximum(np.round(side), 1), shape).astype(int)
        if np.all(size <= shape):
            start = np.array([rng.integers(0, s - c + 1) for s, c in zip(shape, size)])
            return start, size
    return np.zeros(3, int), np.asarray(shape, int)


@dataclasses.dataclass
class RandomResizedCrop3D:
    size: tuple[int, int, int]
    scale: tuple[float, float] = (0.32, 1.0)

    def __call__(self, vol, rng, label=None):
        vol = _pad_to(vol, self.size)
        start, size = random_crop_box(rng, vol.shape[:3], self.scale)
        sl = tuple(slice(int(a), int(a + b)) for a, b in zip(start, size))
        out = _resize(vol[sl], self.size)
        if label is None:
            return out
        lab = _pad_to(label[..., None], self.size)[sl]
        zoom = [t / s for t, s in zip(self.size, lab.shape[:3])] + [1.0]
        return out, ndimage.zoom(lab, zoom, order=0, grid_mode=True, mode="nearest")[..., 0]


@dataclasses.dataclass
class Augment:
    """Flips, intensity scale / shift / gamma and Gaussian noise (each optional)."""

    flip_p: float = 0.5
    scale: float = 0.1
    shift: float = 0.1
    gamma: float = 0.2
    noise: float = 0.02

    def __call__(self, vol, rng):
        for ax in range(3):
            if rng.random() < self.flip_p:
                vol = np.flip(vol, ax)
        if self.gamma:
            g = float(np.exp(rng.uniform(-self.gamma, self.gamma)))
            vol = np.clip(vol, 0, None) ** g
        vol = vol * (1 + rng.uniform(-self.scale, self.scale)) + rng.uniform(-self.shift, self.shift)
        if self.noise:
            vol = vol + rng.normal(0, self.noise, vol.shape).astype(np.float32)
        return np.ascontiguousarray(vol, dtype=np.float32)


def block_mask(rng: np.random.Generator, grid, n_masked: int, min_block: int = 4, max_tries: int = 10) -> np.ndarray:
    """BEiT / DINOv2 block masking in 3D: boxes of random volume and aspect until ``n_masked``.

    Each box has between ``min_block`` and the remaining budget tokens, log-uniform aspect
    ratios in [0.3, 1/0.3] per axis pair; at most ``max_tries`` attempts per box.
    """
    mask = np.zeros(grid, bool)
    count = 0
    total_tries = 0
    while count < n_masked and total_tries < 200:
        total_tries += 1
        budget = n_masked - count
        placed = False
        for _ in range(max_tries):
            target = rng.uniform(min(min_block, budget), budget)
            r = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), 3))
            r = r / np.cbrt(np.prod(r))
            size = np.clip(np.round(np.cbrt(target) * r).astype(int), 1, grid)
            start = [rng.integers(0, g - s + 1) for g, s in zip(grid, size)]
            sl = tuple(slice(a, a + s) for a, s in zip(start, size))
            new = int(size.prod() - mask[sl].sum())
            if 0 < new <= budget:
                mask[sl] = True
                count += new
                placed = True
                break
        if not placed and budget < min_block:
            break
    return mask.reshape(-1)


@dataclasses.dataclass
class MultiCrop(grain.transforms.RandomMap):
    """DINO multi-crop in 3D, plus iBOT block masks for the global crops.

    Output: ``global`` (2, *global_size, C), ``local`` (n_local, *local_size, C), ``masks``
    (2, tokens) bool. Half of the global crops (in expectation, ``mask_probability``) get a
    mask with a ratio drawn from ``mask_ratio`` (DINOv2: probability 0.5, ratio [0.1, 0.5]).
    """

    global_size: tuple[int, int, int] = (32, 32, 32)
    local_size: tuple[int, int, int] = (16, 16, 16)
    n_local: int = 4
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    patch_size: tuple[int, int, int] = (8, 8, 8)
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    augment: Augment = dataclasses.field(default_factory=Augment)

    @property
    def grid(self):
        return tuple(s // p for s, p in zip(self.global_size, self.patch_size))

    def random_map(self, ex, rng: np.random.Generator):
        vol = ex["image"]
        g = RandomResizedCrop3D(self.global_size, self.global_scale)
        loc = RandomResizedCrop3D(self.local_size, self.local_scale)
        globals_ = np.stack([self.augment(g(vol, rng), rng) for _ in range(2)])
        locals_ = (np.stack([self.augment(loc(vol, rng), rng) for _ in range(self.n_local)]) if self.n_local
                   else np.zeros((0, *self.local_size, vol.shape[-1]), np.float32))
        n_tok = int(np.prod(self.grid))
        masks = np.zeros((2, n_tok), bool)
        for i in range(2):
            if rng.random() < self.mask_probability:
                ratio = rng.uniform(*self.mask_ratio)
                masks[i] = block_mask(rng, self.grid, int(round(ratio * n_tok)))
        return {"global": globals_, "local": locals_, "masks": masks}


@dataclasses.dataclass
class SingleCrop(grain.transforms.RandomMap):
    """One augmented random-resized crop (stage 2 / supervised); keeps metadata."""

    size: tuple[int, int, int] = (32, 32, 32)
    scale: tuple[float, float] = (0.5, 1.0)
    augment: Augment = dataclasses.field(default_factory=lambda: Augment(noise=0.0))

    def random_map(self, ex, rng):
        out = dict(ex)
        out["image"] = self.augment(RandomResizedCrop3D(self.size, self.scale)(ex["image"], rng), rng)
        return out


@dataclasses.dataclass
class Resize(grain.transforms.Map):
    """Deterministic whole-volume resize (evaluation), image and optional label map."""

    size: tuple[int, int, int] = (32, 32, 32)

    def map(self, ex):
        out = dict(ex)
        out["image"] = _resize(ex["image"], self.size)
        if "label" in ex:
            zoom = [t / s for t, s in zip(self.size, ex["label"].shape)]
            out["label"] = ndimage.zoom(ex["label"], zoom, order=0, grid_mode=True, mode="nearest")
        return out

"""Pixel-only region features: crop -> random conv bank -> pooling -> standardise -> project.

No label, id or attribute enters a feature except through the pixels inside the region's
box. For each box the crop is resampled to ``crop_size x crop_size`` (bilinear, with
``crop_supersample`` samples per output pixel per axis averaged, and the sample positions
clamped to the box's own pixel centres so interpolation never reads a pixel outside the
box). The crop then goes through a fixed, seeded bank of random ``filter_size`` conv filters
with ReLU, pooled as a ``pool_grid x pool_grid`` average grid plus a global max, and
RGB mean and std are appended. A second, ``native_size`` window at the box centre, taken at
the image's own resolution, goes through the same filters (mean and max pooled): resizing
alone erases scale, and "small"/"large" must be visible. These *raw* features are
standardised with statistics of the train split and mapped by a fixed random projection to
``feature_dim``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from thsrn_lib.data.scenes.config import ScenesConfig

__all__ = ["FeatureSpec", "RegionFeaturizer", "RunningStats"]

# Sample positions stay this far (in pixels) inside the outermost pixel centres of the box, so
# bilinear weights on the first pixel outside the box are exactly zero despite float rounding.
_EDGE_MARGIN = 0.01


@dataclass(frozen=True)
class FeatureSpec:
    """Parameters of the feature extractor (a subset of :class:`ScenesConfig`)."""

    crop_size: int
    crop_supersample: int
    n_filters: int
    filter_size: int
    pool_grid: int
    native_size: int
    feature_dim: int
    seed: int

    @classmethod
    def from_config(cls, cfg: ScenesConfig) -> FeatureSpec:
        return cls(cfg.crop_size, cfg.crop_supersample, cfg.n_filters, cfg.filter_size, cfg.pool_grid,
                   cfg.native_size, cfg.feature_dim, cfg.feature_seed)

    @property
    def raw_dim(self) -> int:
        """Size of the raw feature: pooled conv responses of both views plus RGB mean and std."""
        return self.n_filters * (self.pool_grid**2 + 1) + 2 * self.n_filters + 6


class RunningStats:
    """Streaming per-dimension mean and std (float64 sums) over rows of ``(n, dim)`` arrays."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self._sum = np.zeros(dim, dtype=np.float64)
        self._sq = np.zeros(dim, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self._sum.shape[0])
        self.n += x.shape[0]
        self._sum += x.sum(axis=0)
        self._sq += np.square(x).sum(axis=0)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` float32; constant dimensions get std 1 so they map to 0, not NaN."""
        if self.n == 0:
            raise ValueError("RunningStats.mean_std: no rows were added")
        mean = self._sum / self.n
        var = np.maximum(self._sq / self.n - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std > 1e-6, std, 1.0)
        return mean.astype(np.float32), std.astype(np.float32)


class RegionFeaturizer:
    """The fixed extractor. Same ``spec`` -> same filters and projection, bit for bit."""

    def __init__(self, spec: FeatureSpec, crops_per_batch: int = 1024, conv_batch: int = 32) -> None:
        self.spec = spec
        self.crops_per_batch = crops_per_batch
        # Small conv batches keep the activations in cache: measured ~3x faster on CPU than 1024.
        self.conv_batch = conv_batch
        rng = np.random.default_rng([int(spec.seed), 0xFEA7])
        k = spec.filter_size
        fan_in = 3 * k * k
        self.weight = torch.from_numpy(
            (rng.standard_normal((spec.n_filters, 3, k, k)) / math.sqrt(fan_in)).astype(np.float32))
        self.bias = torch.from_numpy(rng.normal(0.0, 0.1, spec.n_filters).astype(np.float32))
        self.projection = (rng.standard_normal((spec.raw_dim, spec.feature_dim))
                           / math.sqrt(spec.raw_dim)).astype(np.float32)

    # ------------------------------------------------------------------ crops
    def _sample(self, img: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """Bilinear samples at a per-region grid: ``gx`` ``(N, R, sx)``, ``gy`` ``(N, R, sy)`` in
        normalised coordinates -> ``(N * R, 3, sy, sx)``."""
        n, r, sx = gx.shape
        sy = gy.shape[-1]
        grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)  # (N,R,sy,sx,2)
        out = F.grid_sample(img, grid.reshape(n, r * sy, sx, 2), mode="bilinear", padding_mode="border",
                            align_corners=False)  # (N, 3, R*sy, sx): regions stacked along the height
        return out.reshape(n, 3, r, sy, sx).transpose(1, 2).reshape(n * r, 3, sy, sx)

    def crops(self, images: np.ndarray, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of every box, float32 in [0, 1]:

        - ``resized`` ``(N * R, 3, S, S)``: the whole box resampled to ``crop_size``;
        - ``native`` ``(N * R, 3, T, T)``: a ``native_size`` window at the box centre at the
          image's own resolution (clamped to the box when the box is smaller). Resizing makes a
          small and a large circle look alike; this window keeps the scale: it shows the
          object's outline when the object is small and only its interior when it is large.

        Every sample position is clamped to the box's own pixel centres, so no pixel outside
        the box influences either view.

        Args:
            images: uint8 ``(N, H, W, 3)``.
            boxes: ``(N, R, 4)`` pixel boxes ``x1, y1, x2, y2`` (x2/y2 exclusive), within the image.
        """
        _, h, w, _ = images.shape
        img = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        b = torch.from_numpy(np.asarray(boxes, dtype=np.float32))  # (N, R, 4)

        def inside(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:
            # continuous coordinates (pixel i covers [i, i+1), its centre is i + 0.5), clamped to
            # the box's outermost pixel centres, then normalised as grid_sample expects
            c = torch.minimum(torch.maximum(c, (lo + 0.5 + _EDGE_MARGIN)[..., None]), (hi - 0.5 - _EDGE_MARGIN)[..., None])
            return c * (2.0 / size) - 1.0

        s = self.spec.crop_size * self.spec.crop_supersample
        frac = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # (s,)
        x1, y1, x2, y2 = b.unbind(-1)
        gx = inside(x1[..., None] + frac * (x2 - x1)[..., None], x1, x2, w)
        gy = inside(y1[..., None] + frac * (y2 - y1)[..., None], y1, y2, h)
        resized = self._sample(img, gx, gy)
        if self.spec.crop_supersample > 1:
            resized = F.avg_pool2d(resized, self.spec.crop_supersample)

        t = self.spec.native_size
        centres = torch.arange(t, dtype=torch.float32) + 0.5  # exact pixel centres: no interpolation
        sx, sy = ((x1 + x2 - t) / 2).floor(), ((y1 + y2 - t) / 2).floor()  # top-left pixel of the window
        native = self._sample(img, inside(sx[..., None] + centres, x1, x2, w), inside(sy[..., None] + centres, y1, y2, h))
        return resized, native

    # ------------------------------------------------------------------ raw features
    @torch.inference_mode()
    def raw(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Raw (unstandardised) features, float32 ``(N, R, raw_dim)``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.ndim != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be (N, R, 4) with N={images.shape[0]}, got {boxes.shape}")
        n, r = boxes.shape[:2]
        per = max(1, self.crops_per_batch // r)
        out = np.empty((n, r, self.spec.raw_dim), dtype=np.float32)
        cb = self.conv_batch
        for start in range(0, n, per):
            resized, native = self.crops(images[start:start + per], boxes[start:start + per])
            desc = torch.cat([self._describe(resized[i:i + cb], native[i:i + cb]) for i in range(0, resized.shape[0], cb)])
            out[start:start + per] = desc.reshape(-1, r, self.spec.raw_dim).numpy()
        return out

    def _describe(self, resized: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
        """``(M, 3, S, S)`` and ``(M, 3, T, T)`` views -> ``(M, raw_dim)``."""
        g = self.spec.pool_grid
        resp = F.conv2d(resized - 0.5, self.weight, self.bias).clamp_min_(0.0)  # ReLU, (M, F, S-k+1, S-k+1)
        grid = F.adaptive_avg_pool2d(resp, g).flatten(1)  # (M, F*g*g)
        peak = resp.amax(dim=(2, 3))  # (M, F)
        # stride 2: the native window only has to reveal scale (outline vs interior), cheaply
        near = F.conv2d(native - 0.5, self.weight, self.bias, stride=2).clamp_min_(0.0)  # (M, F, T', T')
        mean = resized.mean(dim=(2, 3))  # (M, 3)
        std = resized.std(dim=(2, 3), unbiased=False)  # (M, 3)
        return torch.cat([grid, peak, near.mean(dim=(2, 3)), near.amax(dim=(2, 3)), mean, std], dim=1)

    # ------------------------------------------------------------------ final features
    def project(self, raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """Standardise raw features ``(..., raw_dim)`` and project them: float32 ``(..., feature_dim)``."""
        z = torch.from_numpy((np.asarray(raw, dtype=np.float32) - mean) / std)
        # torch rather than numpy: follows torch's thread setting (a multithreaded BLAS spinning
        # on a busy 2-core machine was 100x slower here).
        return torch.matmul(z, torch.from_numpy(self.projection)).numpy()

"""Rasterise scenes into RGB images (numpy, with PIL-drawn shape templates).

The image is a pure function of the scene description and the renderer's seed: a lightly
textured background (a per-image tint, a smooth low-frequency field and fine noise cut from
a fixed noise texture at a per-image offset), then each object alpha-composited from its
anti-aliased template, striped objects alternating their colour with a darker shade of it.
"""
from __future__ import annotations

import numpy as np

from thsrn_lib.data.scenes.shapes import ShapeBank
from thsrn_lib.data.scenes.world import Scene

__all__ = ["Renderer"]

_BACKGROUND_RGB = np.array([196.0, 194.0, 188.0], dtype=np.float32)  # light warm grey
_TINT = 10.0  # per-image uniform shift of the background colour
_FIELD_STD = 9.0  # std of the smooth background field (brightness)
_FIELD_CHROMA_STD = 3.0  # std of its per-channel part
_NOISE_STD = 4.0  # std of the fine pixel noise
_FIELD_GRID = 5  # the smooth field is bilinear over a 5 x 5 grid of random values
_STRIPE_SHADE = 0.45  # stripes are the object's colour darkened to this factor (keeps the hue)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear interpolation weights ``(n_out, n_in)`` (align-corners), for a separable upsample."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    w = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - w
    m[np.arange(n_out), lo + 1] += w
    return m


class Renderer:
    """Render :class:`Scene` objects of size ``canvas x canvas`` to uint8 ``(H, W, 3)``."""

    def __init__(self, canvas: int, seed: int, bank: ShapeBank | None = None) -> None:
        self.canvas = canvas
        self.bank = bank if bank is not None else ShapeBank()
        rng = np.random.default_rng([int(seed), 0x7E47])
        # Twice the canvas so that every per-image offset cuts a full canvas-sized window.
        self._noise = (rng.standard_normal((2 * canvas, 2 * canvas, 3)) * _NOISE_STD).astype(np.float32)
        self._interp = _interp_matrix(canvas, _FIELD_GRID)
        self._stripe_cache: dict[tuple[int, int, int, int], np.ndarray] = {}

    def backgrounds(self, scenes: list[Scene]) -> np.ndarray:
        """float32 ``(N, H, W, 3)`` backgrounds (before objects), each from its scene's seed."""
        c = self.canvas
        n = len(scenes)
        tint = np.empty((n, 1, 1, 3), dtype=np.float32)
        grid = np.empty((n, _FIELD_GRID, _FIELD_GRID, 3), dtype=np.float32)
        offsets = []
        for i, scene in enumerate(scenes):
            rng = np.random.default_rng(scene.background_seed)
            tint[i, 0, 0] = rng.uniform(-_TINT, _TINT, 3)
            # mostly brightness variation with a little colour, so it never looks like an object colour
            grid[i] = (rng.standard_normal((_FIELD_GRID, _FIELD_GRID, 1)) * _FIELD_STD
                       + rng.standard_normal((_FIELD_GRID, _FIELD_GRID, 3)) * _FIELD_CHROMA_STD)
            offsets.append(tuple(int(v) for v in rng.integers(0, c, 2)))
        # Separable bilinear upsampling as two stacked matmuls: numpy runs one gemm per image, so
        # an image's pixels do not depend on which other images share the batch.
        g, n_ = _FIELD_GRID, n
        rows = np.matmul(self._interp, grid.reshape(n_, g, g * 3))  # (N, H, G*3)
        rows = rows.reshape(n_, c, g, 3).transpose(0, 1, 3, 2).reshape(n_, c * 3, g)
        field = np.matmul(rows, self._interp.T).reshape(n_, c, 3, c).transpose(0, 1, 3, 2)  # (N, H, W, 3)
        out = np.empty((n, c, c, 3), dtype=np.float32)  # C-contiguous: the per-image adds below stay fast
        np.add(field, tint + _BACKGROUND_RGB, out=out)
        for i, (ox, oy) in enumerate(offsets):
            out[i] += self._noise[oy:oy + c, ox:ox + c]
        return out

    def render(self, scene: Scene) -> np.ndarray:
        """uint8 ``(H, W, 3)`` image of ``scene``."""
        return self.render_batch([scene])[0]

    def render_batch(self, scenes: list[Scene]) -> np.ndarray:
        """uint8 ``(N, H, W, 3)``; each image depends only on its own scene."""
        for s in scenes:
            if s.width != self.canvas or s.height != self.canvas:
                raise ValueError(f"scene is {s.width}x{s.height} but the renderer draws {self.canvas}x{self.canvas}")
        imgs = self.backgrounds(scenes)
        for img, scene in zip(imgs, scenes):
            for o in scene.objects:
                a = self.bank.alpha(o.shape, o.side)[:, :, None]
                colour = np.asarray(o.rgb, dtype=np.float32)
                if o.pattern == "striped":
                    colour = np.where(self._stripes(o.side, o.stripe)[:, :, None], colour * _STRIPE_SHADE, colour)
                patch = img[o.y:o.y + o.side, o.x:o.x + o.side]
                patch *= 1.0 - a
                patch += a * colour
        np.rint(imgs, out=imgs)
        np.clip(imgs, 0, 255, out=imgs)
        return imgs.astype(np.uint8)

    def _stripes(self, side: int, stripe: tuple[int, int, int]) -> np.ndarray:
        """Boolean ``(side, side)``: which pixels of the template lie on a dark stripe (cached)."""
        key = (side, *stripe)
        if key not in self._stripe_cache:
            orientation, period, phase = stripe
            yy, xx = np.mgrid[0:side, 0:side]
            t = (yy, xx, xx + yy, xx - yy + side)[orientation] + phase
            self._stripe_cache[key] = (t % period) < (period // 2)
        return self._stripe_cache[key]

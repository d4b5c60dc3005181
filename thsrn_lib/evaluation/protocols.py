"""Retrieval protocols: which split, which matrix sizes, how many folds (``data_and_protocol.md`` §4).

=========  ===========  ===========================  ===================================================
protocol   split        images x captions            how
=========  ===========  ===========================  ===================================================
f30k       ``test``     exactly 1,000 x 5,000        one matrix (Flickr30K 1K test)
coco1k     ``testall``  exactly 5,000 x 25,000       5 consecutive folds of 1,000 x 5,000, metrics averaged
coco5k     ``testall``  exactly 5,000 x 25,000       one matrix
dev        ``dev``      any (5 captions per image)   one matrix; the dataset caps dev at 5,000 captions
scenes     ``test``     any (5 captions per image)   one matrix (the built-in Scenes benchmark)
generic    ``test``     any (5 captions per image)   one matrix
=========  ===========  ===========================  ===================================================

COCO 1K is ``testall`` cut into 5 folds, *not* the 1,000-image ``test`` split: 5-fold on
1,000 images gave empty folds in the official code (SCAN issue #14); here it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, DataError

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "fold_slices"]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    Attributes:
        name: the key in :data:`PROTOCOLS` (the CLI's ``--protocol``).
        default_split: the split it evaluates unless told otherwise.
        folds: number of consecutive equal folds whose metrics are averaged (1 = one matrix).
        n_images: exact number of images required, or None for any.
        captions_per_image: ground-truth captions per image (caption k -> image k // cpi).
        description: one line for tables and ``--help``.
    """

    name: str
    default_split: str
    folds: int = 1
    n_images: int | None = None
    captions_per_image: int = 5
    description: str = ""

    @property
    def n_captions(self) -> int | None:
        return None if self.n_images is None else self.n_images * self.captions_per_image

    def check_shape(self, n_images: int, n_captions: int, source: str = "") -> None:
        """Raise :class:`DataError` unless ``n_images x n_captions`` fits this protocol."""
        where = f" ({source})" if source else ""
        cpi = self.captions_per_image
        if n_images <= 0 or n_captions != cpi * n_images:
            raise DataError(
                f"protocol {self.name!r} needs {cpi} captions per image (n_captions = {cpi} x n_images), got "
                f"{n_images} images x {n_captions} captions{where}"
            )
        if self.n_images is not None and n_images != self.n_images:
            hint = ""
            if self.folds > 1 and n_images * self.folds == self.n_images:
                hint = (
                    f" This looks like a single fold (e.g. COCO 'test'): {self.folds}-fold evaluation of it would "
                    f"leave empty folds. Use --split testall for {self.name}, or --protocol generic to score "
                    "this split as one matrix."
                )
            elif self.n_images == 5000:
                hint = " Use the COCO 'testall' split, or --protocol generic for other data."
            else:
                hint = " Use --protocol generic (or scenes) for data of another size."
            raise DataError(
                f"protocol {self.name!r} ({self.description}) needs exactly {self.n_images:,} images and "
                f"{self.n_captions:,} captions, got {n_images:,} x {n_captions:,}{where}.{hint}"
            )
        fold_slices(n_images, self.folds, cpi)  # validates divisibility

    def fold_slices(self, n_images: int) -> list[tuple[slice, slice]]:
        """``[(image_slice, caption_slice)]`` of every fold for ``n_images`` images."""
        return fold_slices(n_images, self.folds, self.captions_per_image)


def fold_slices(n_images: int, folds: int = 1, captions_per_image: int = 5) -> list[tuple[slice, slice]]:
    """Consecutive equal folds: fold ``f`` = images ``[f n, (f+1) n)`` and captions ``[f n c, (f+1) n c)``.

    ``n = n_images / folds``, ``c = captions_per_image``. For COCO 1K (5,000 images, 5 folds) fold
    ``k`` is images ``1000k .. 1000k+999`` and captions ``5000k .. 5000k+4999``.

    Raises:
        ConfigError: ``folds`` is not a positive integer, or does not divide ``n_images`` into
            non-empty equal folds.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ConfigError(f"folds must be a positive integer, got {folds!r}")
    if n_images < folds or n_images % folds:
        raise ConfigError(
            f"cannot split {n_images} images into {folds} equal non-empty folds; "
            f"{folds}-fold evaluation needs a multiple of {folds} images (COCO 1K: 5,000 images of testall)"
        )
    n = n_images // folds
    c = n * captions_per_image
    return [(slice(f * n, (f + 1) * n), slice(f * c, (f + 1) * c)) for f in range(folds)]


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("f30k", "test", folds=1, n_images=1000, description="Flickr30K 1K test, one 1,000 x 5,000 matrix"),
        Protocol(
            "coco1k",
            "testall",
            folds=5,
            n_images=5000,
            description="MS-COCO 1K: 5 folds of 1,000 x 5,000 from testall, metrics averaged",
        ),
        Protocol("coco5k", "testall", folds=1, n_images=5000, description="MS-COCO 5K: one 5,000 x 25,000 matrix"),
        Protocol("dev", "dev", folds=1, description="validation split (capped at 5,000 captions), one matrix"),
        Protocol("scenes", "test", folds=1, description="Scenes benchmark, one matrix"),
        Protocol("generic", "test", folds=1, description="any split with 5 captions per image, one matrix"),
    )
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The :class:`Protocol` named ``protocol`` (a Protocol passes through)."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]

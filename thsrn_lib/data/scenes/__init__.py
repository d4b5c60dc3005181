"""Scenes: the built-in synthetic image-text benchmark with ground-truth word-region alignments.

Quick start::

    from thsrn_lib.data.scenes import generate
    root = generate("demo", out="data/scenes")  # -> data/scenes/demo (cached by parameter hash)

or ``thsrn scenes --preset demo`` / ``python -m thsrn_lib.data.scenes --preset demo``.
Presets: ``tiny`` (tests, ~1 s), ``demo`` (3,000/500/500/200 images, R=16, D=256, 128 px),
``full`` (256 px, R=36, D=2048). Any :class:`ScenesConfig` field can be overridden
(``generate("demo", n_train=500)``); other seeds/overrides go to ``<out>/<preset>-<hash10>``.

Folder layout (the SCAN precomp layout plus Scenes-only extras); splits ``train``, ``dev``,
``test`` and ``binding``:

- ``{split}_ims.npy`` float32 ``(n_images, R, D)``; ``{split}_caps.txt`` (5 lines per image,
  caption k describes image k // 5); ``{split}_ids.txt``; ``vocab.json`` (SCAN layout, from
  train + dev captions with ``vocab_min_count``);
- ``{split}_boxes.npy`` float32 ``(n_images, R, 4)``: pixel ``x1, y1, x2, y2``, x2/y2
  exclusive; region order is shuffled;
- ``images/{split}/{id}.png``;
- ``{split}_scenes.jsonl``: per image, its objects (shape, colour, size, pattern, rgb, tight
  ``box``), the geometric ``relations`` (``left_of``, ``right_of``, ``above``, ``below``,
  ``next_to``; pairs ``[a, b]`` meaning "a REL b") and each region's ``kinds``
  (object/part/pair/background) and ``sources`` (object ids);
- ``{split}_alignments.jsonl``: per caption ``{"caption": k, "image": k // 5, "text",
  "tokens": tokenize(text), "align": [...], "relations": [...], "meaning": {...}}``. Each
  ``align`` entry ``{"token": p, "word", "type", "object", "regions", "in_relation"}`` says
  that token p names object ``object`` as its ``type`` (``colour``, ``shape``, ``size``,
  ``pattern``, ``count``, or ``relation`` for the head word of "to the left of", "above",
  "next to", ...), and ``regions`` are the indices of the regions whose box has IoU >= 0.5
  with that object's box. **p indexes** ``tokenize(caption)``; in model ids, which start with
  ``<start>``, the same word sits at **p + 1**. A token naming several objects ("two red
  circles") has one entry per object (:func:`pointing_targets` merges them); a relation head
  word has one entry for each of its two objects. ``in_relation`` marks every word inside a
  relation caption; ``relations`` lists the relation phrases (token positions, head,
  subject and object ids); ``meaning`` is the caption's logical form (see
  :mod:`thsrn_lib.data.scenes.meaning`).
- ``binding_swapped_caps.txt``: line k is ``binding_caps.txt`` line k with one attribute
  (colour, shape, size or pattern) swapped between two mentioned objects, same words,
  false for image k // 5; ``binding_swaps.jsonl`` says which; :func:`binding_accuracy`.
- ``meta.json``: generator version, seed, preset, every parameter, their hash; written last
  (its presence marks a complete data set).
"""
from thsrn_lib.data.scenes.analysis import (
    binding_accuracy,
    caption_ambiguity_ceiling,
    load_alignments,
    load_scenes,
    load_swapped_captions,
    pointing_targets,
)
from thsrn_lib.data.scenes.config import GENERATOR_VERSION, PRESETS, SPLITS, ScenesConfig, make_config, param_names
from thsrn_lib.data.scenes.generate import GenerationReport, dataset_dir, generate, generate_with_report, is_complete

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "SPLITS",
    "ScenesConfig",
    "make_config",
    "param_names",
    "generate",
    "generate_with_report",
    "GenerationReport",
    "dataset_dir",
    "is_complete",
    "binding_accuracy",
    "caption_ambiguity_ceiling",
    "load_alignments",
    "load_scenes",
    "load_swapped_captions",
    "pointing_targets",
]

# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python (thsrn-workbench)
#     language: python
#     name: thsrn
# ---

# %% [markdown]
# # 01 · Data tour
#
# A first look at a data set in the SCAN *precomp* layout: the built-in **Scenes** benchmark or
# real Flickr30K / MS-COCO region features. For every split we report its size and feature
# shape, the caption lengths and the vocabulary coverage; Scenes (and any data set that ships
# boxes and pictures) also gets sample images with their region boxes.
#
# Nothing here depends on a model. The format is described in `docs/data.md`.

# %% tags=["parameters"]
output_dir: str = ""  # folder for metrics.json and figures (empty: reports/interactive/01_data_tour)
smoke: bool = False  # tiny Scenes data and fewer samples (the test suite's setting)
data: str = "scenes:demo"  # "scenes:<preset>" (generated once, cached) or a precomp folder, e.g. data/f30k_precomp
scenes_dir: str = "data/scenes"  # cache folder of generated Scenes data sets (relative to the project root)
splits: list = ["train", "dev", "test"]  # splits to describe; missing ones are reported and skipped
n_samples: int = 6  # images shown with their captions (and boxes, when the data has them)
top_words: int = 25  # most frequent words in the bar chart
seed: int = 0  # picks the sample images

# %%
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np

from thsrn_lib import notebook_utils as nbu
from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.errors import DataError

if smoke:  # seconds instead of minutes
    data, n_samples, top_words = "scenes:tiny", 3, 10
out = nbu.output_folder(output_dir, "01_data_tour")
root = nbu.resolve_data(data, scenes_dir)
scenes = nbu.is_scenes(root)
print(f"data: {root}  (Scenes: {scenes})")

# %% [markdown]
# ## Splits and shapes
# `im_div` tells how features are stored: 5 = one row per image, 1 = one row per caption (the
# Flickr30K dev file repeats each image 5 times). The dev split is capped at 5,000 captions, as in
# the official evaluation.

# %%
sets, rows = {}, []
for split in splits:
    try:
        ds = nbu.open_split(root, split)
    except DataError as exc:
        print(f"skipping {split}: {exc}")
        continue
    sets[split] = ds
    rows.append({"split": split, "images": ds.n_images, "captions": ds.n_captions, "regions R": ds.num_regions,
                 "feature dim D": ds.feature_dim, "im_div": ds.im_div, "boxes": ds.boxes is not None,
                 "pictures": ds.image_path(0) is not None, "alignments": ds.alignments_path.is_file()})
if not sets:
    raise DataError(f"none of the splits {splits} exists in {root}")
nbu.show_table(rows, index="split")
vocab = next(iter(sets.values())).vocab

# %% [markdown]
# ## Captions: length and vocabulary
# Lengths count word tokens (the model adds `<start>` and `<end>`). A token outside the vocabulary
# becomes `<unk>`; the rate shows how well the vocab covers each split.

# %%
stats, lengths, counts = {}, {}, {}
for split, ds in sets.items():
    toks = [tokenize(c) for c in ds.captions]
    n = np.array([len(t) for t in toks])
    c = Counter(w for t in toks for w in t)
    unk = sum(v for w, v in c.items() if w not in vocab)
    lengths[split], counts[split] = n, c
    stats[split] = {"images": ds.n_images, "captions": ds.n_captions, "len_mean": float(n.mean()),
                    "len_median": float(np.median(n)), "len_p95": float(np.percentile(n, 95)), "len_max": int(n.max()),
                    "word_types": len(c), "unk_rate_percent": 100.0 * unk / max(1, n.sum())}
nbu.show_table([{"split": s, **v} for s, v in stats.items()], index="split")
print(f"vocabulary: {len(vocab)} words (including 4 specials)")

# %%
fig_text, (ax_len, ax_top) = plt.subplots(1, 2, figsize=(12, 3.8))
bins = np.arange(0, max(int(v.max()) for v in lengths.values()) + 2)
for split, n in lengths.items():
    ax_len.hist(n, bins=bins, histtype="step", lw=1.5, density=True, label=split)
ax_len.set(xlabel="words per caption", ylabel="fraction of captions", title="caption length")
ax_len.legend()
first = next(iter(counts))
common = counts[first].most_common(top_words)
ax_top.bar(range(len(common)), [v for _, v in common])
ax_top.set_xticks(range(len(common)), [w for w, _ in common], rotation=70, fontsize=8)
ax_top.set_title(f"{top_words} most frequent words ({first})")
fig_text.tight_layout()
nbu.save_figure(fig_text, out, "captions")

# %% [markdown]
# ## Region features
# Norms and value ranges of a sample of region vectors: a quick check that the features are what the
# models expect (real bottom-up features are non-negative and sparse; Scenes features are
# standardised projections).

# %%
rng = np.random.default_rng(seed)
feat_stats = {}
fig_feat, ax_feat = plt.subplots(figsize=(6, 3.4))
for split, ds in sets.items():
    pick = np.sort(rng.choice(ds.n_images, size=min(200, ds.n_images), replace=False))
    feats = np.stack([np.asarray(ds.image_features(i)) for i in pick])  # (n, R, D)
    norms = np.linalg.norm(feats, axis=-1).ravel()
    feat_stats[split] = {"norm_mean": float(norms.mean()), "value_min": float(feats.min()),
                         "value_max": float(feats.max()), "zero_fraction": float((feats == 0).mean())}
    ax_feat.hist(norms, bins=40, histtype="step", lw=1.5, density=True, label=split)
ax_feat.set(xlabel="L2 norm of a region feature", ylabel="density", title="region feature norms")
ax_feat.legend()
nbu.save_figure(fig_feat, out, "features")
nbu.show_table([{"split": s, **v} for s, v in feat_stats.items()], index="split", floatfmt="{:.3f}")

# %% [markdown]
# ## Sample images
# With boxes when the data set has them (cyan: all R regions, as a detector would propose them).
# Real precomputed features come without pictures; their feature matrices are shown instead.

# %%
show_split = "test" if "test" in sets else first
ds = sets[show_split]
sample = np.sort(rng.choice(ds.n_images, size=min(n_samples, ds.n_images), replace=False)).tolist()
fig_samples = nbu.caption_grid(ds, sample, boxes=ds.boxes is not None)
nbu.save_figure(fig_samples, out, "samples")

# %% [markdown]
# ## Scenes only: what the captions can and cannot tell apart
# A caption such as "a red circle" is true of several images, so even a perfect model cannot
# always rank the right image first. The **ceiling** is the best text-to-image recall any model
# can expect on this split; compare model results with it, not with 100.

# %%
scenes_info = {}
if scenes:
    from thsrn_lib.data.scenes import caption_ambiguity_ceiling, load_alignments, load_scenes

    scenes_info["ceiling"] = caption_ambiguity_ceiling(root, show_split)
    objects = np.array([len(s["objects"]) for s in load_scenes(root, show_split)])
    types = Counter(a["type"] for r in load_alignments(root, show_split) for a in r["align"])
    scenes_info["objects_per_image"] = {str(k): int(v) for k, v in zip(*np.unique(objects, return_counts=True))}
    scenes_info["aligned_word_types"] = dict(types)
    nbu.show_table([scenes_info["ceiling"]], floatfmt="{:.1f}")
    fig_sc, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
    a1.bar(list(scenes_info["objects_per_image"]), list(scenes_info["objects_per_image"].values()))
    a1.set(xlabel="objects per image", ylabel="images", title=f"objects ({show_split})")
    a2.bar(list(types), list(types.values()))
    a2.set(title="aligned words by type", ylabel="tokens")
    fig_sc.tight_layout()
    nbu.save_figure(fig_sc, out, "scenes")
else:
    print("not a Scenes data set: no ground-truth alignments to summarise")

# %% [markdown]
# ## Saved artifacts
# `metrics.json` holds every number above; the figures are PNG files next to it.

# %%
metrics = {"data": str(root), "scenes": scenes, "vocab_size": len(vocab), "splits": stats,
           "features": feat_stats, "scenes_info": scenes_info}
summary = {"vocab_size": len(vocab), **{f"{s}_images": v["images"] for s, v in stats.items()},
           "caption_len_mean": stats[first]["len_mean"]}
if scenes:
    summary["t2i_r1_ceiling"] = scenes_info["ceiling"]["t2i_r1"]
nbu.save_metrics(out, metrics, summary=summary)
print(sorted(p.name for p in out.iterdir()))

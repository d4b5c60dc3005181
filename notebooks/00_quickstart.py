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
# # 00 · Quick start
#
# Image-text matching in ten minutes on a laptop CPU:
#
# 1. generate **Scenes**, the built-in synthetic benchmark (pictures of coloured shapes, five
#    captions each, region features computed from the pixels);
# 2. look at a few images and captions;
# 3. train a small **TSHSR** model for a few minutes;
# 4. retrieve images for a caption and captions for an image;
# 5. see where the model looks for each word (an alignment map), next to the ground truth that
#    only Scenes provides.
#
# **Paper.** R. Chen, H. Wang, L. Wang, S. Kwong, *Two-stream Hierarchical Similarity Reasoning for
# Image-text Matching*, arXiv:2203.05349 (2022), https://arxiv.org/abs/2203.05349. Only its abstract
# is public: the model here is a documented reconstruction built on SGRAF (H. Diao et al., AAAI 2021,
# https://arxiv.org/abs/2101.01368), so its numbers are re-implementation numbers, not the paper's.

# %% tags=["parameters"]
output_dir: str = ""  # folder for metrics.json and figures (empty: reports/interactive/00_quickstart)
smoke: bool = False  # tiny data and a few training steps (the test suite's setting)
preset: str = "demo"  # Scenes preset: tiny (seconds), demo (the default), full (36 x 2048 features, slow)
scenes_dir: str = "data/scenes"  # cache folder of generated Scenes data sets (relative to the project root)
train_steps: int = 400  # optimiser steps; about 2-3 minutes on a laptop CPU with the demo preset
batch_size: int = 32  # captions per step; the other captions of the batch are the negatives
lr: float = 0.004  # Adam learning rate: 4x the 2-epoch recipe's, which short runs learn much faster with
embed_size: int = 64  # joint embedding size (the paper-size model uses 1024)
sim_dim: int = 32  # size of the similarity vectors that the reasoning module works on
seed: int = 0  # weights, data order and the examples shown

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from thsrn_lib import notebook_utils as nbu
from thsrn_lib import viz
from thsrn_lib.checkpoint import load_model
from thsrn_lib.evaluation import evaluate, ranks_i2t, ranks_t2i

if smoke:  # a quick run for the tests
    preset, train_steps, batch_size, embed_size, sim_dim = "tiny", 6, 16, 32, 16
out = nbu.output_folder(output_dir, "00_quickstart")
rng = np.random.default_rng(seed)

# %% [markdown]
# ## 1. The data
# `generate` writes the data set once and reuses it afterwards (it is cached by its parameters).
# The folder has the same layout as the real Flickr30K / MS-COCO features, so everything below also
# works on real data.

# %%
root = nbu.resolve_data(f"scenes:{preset}", scenes_dir)
train_set = nbu.open_split(root, "train")
test_set = nbu.open_split(root, "test")
print(f"{root}\ntrain: {train_set.n_images} images, {train_set.n_captions} captions; "
      f"test: {test_set.n_images} images; {train_set.num_regions} regions x {train_set.feature_dim}-d features; "
      f"vocabulary {len(train_set.vocab)} words")

# %% [markdown]
# ## 2. Images and captions
# Each image has five captions. A caption mentions some of the objects, with attributes and
# relations; the cyan boxes are the regions a detector would propose, and each region's feature
# vector is all the model sees of the picture.

# %%
examples = rng.choice(test_set.n_images, size=min(3, test_set.n_images), replace=False).tolist()
fig_data = nbu.caption_grid(test_set, examples, boxes=True)
nbu.save_figure(fig_data, out, "examples")

# %% [markdown]
# ## 3. Train a small TSHSR
# The loss is a hinge ranking loss: a caption should score its own image higher than the other
# images of the batch (by a margin), and vice versa. It sums over all violating negatives: on Scenes
# the hardest in-batch "negative" is often another true match (many captions fit several images),
# and training on it alone stalls small models. The settings follow `configs/scenes_demo_tshsr.yaml`
# (the recipe `make demo` trains), cut to `train_steps`, with a larger learning rate (4e-3 instead of
# 1e-3: after 250 steps the dev rsum was 347 instead of 253). The curves redraw while training runs;
# validation uses the first 100 images of the dev split.

# %%
config = nbu.train_config(
    "tshsr", root, out / "run",
    model_config={"embed_size": embed_size, "word_dim": embed_size, "sim_dim": sim_dim, "hsr_levels": 2},
    optim={"epochs": 1000, "batch_size": batch_size, "lr": lr, "max_violation": False},
    run={"max_steps": train_steps, "val_every_steps": max(3, train_steps // 5), "log_every": max(1, train_steps // 30),
         "seed": seed},
    data={"max_val_captions": 500},
)
run = nbu.train_with_curves(config, title="TSHSR on Scenes")
nbu.save_figure(run.figure, out, "training")
print(f"{run.result.step} steps in {run.seconds:.0f} s")

# %% [markdown]
# ## 4. Retrieval on the test split
# The model scores every (image, caption) pair. R@K is the percentage of queries whose correct
# answer is among the top K. Scenes captions are often true of several images ("a red circle"),
# so text-to-image recall has a **ceiling** below 100, also shown.

# %%
from thsrn_lib.data.scenes import caption_ambiguity_ceiling

model = load_model(run.result.last_checkpoint).model  # the model at the end of training
result = evaluate(model, test_set, protocol="scenes", progress=False)
ceiling = caption_ambiguity_ceiling(root, "test")
m = result.metrics
nbu.show_table([{"direction": "image -> text", "R@1": m["i2t_r1"], "R@5": m["i2t_r5"], "R@10": m["i2t_r10"]},
                {"direction": "text -> image", "R@1": m["t2i_r1"], "R@5": m["t2i_r5"], "R@10": m["t2i_r10"]},
                {"direction": "text -> image ceiling", "R@1": ceiling["t2i_r1"], "R@5": ceiling["t2i_r5"],
                 "R@10": ceiling["t2i_r10"]}], index="direction", floatfmt="{:.1f}")
print(f"rsum {m['rsum']:.1f} (sum of the six recalls; 600 is perfect)")

# %%
sims = result.sims
r_t2i = ranks_t2i(sims)
query = int(rng.choice(test_set.n_captions))
visual = viz.VisualContext.from_dataset(test_set)
fig_ret = viz.image_gallery(sims[:, query], visual, k=min(5, test_set.n_images), gt=[query // 5],
                            query=test_set.captions[query], ncols=5)
nbu.save_figure(fig_ret, out, "retrieval")
display(fig_ret)  # thsrn_lib.viz builds figures without pyplot: they are shown explicitly
nbu.show_table(nbu.image_to_text_rows(test_set, sims, query // 5, k=5), index="rank", floatfmt="{:.3f}")

# %% [markdown]
# ## 5. Where does the model look?
# For each word, TSHSR's text-to-image attention spreads weight over the regions (the same view as
# `05_alignments`). Strongly tinted boxes received the most weight; dashed green boxes are the
# regions that truly show the object the word names (Scenes records this for every caption). A
# hit (✓) means the most attended region is one of them.

# %%
pair = viz.pair_maps(model, test_set, image_index=query // 5, caption_index=query)
fig_align = viz.pair_attention(pair, "t2i", visual, positions=sorted(pair.gt_regions) or None)
nbu.save_figure(fig_align, out, "alignment")
display(fig_align)
t2i = pair.word_region["t2i"]  # (words, regions), model positions (<start> first)
pointing = [{"word": pair.tokens[p], "top_region": int(t2i[p].argmax()), "hit": int(t2i[p].argmax()) in gt}
            for p, gt in sorted(pair.gt_regions.items())]
if pointing:
    nbu.show_table(pointing, index="word")

# %% [markdown]
# ## Saved artifacts
# Metrics (test recalls, ceiling, training time) go to `metrics.json`; the figures are PNG files.
# Next: `01_data_tour` for the data, `02_train` for full training runs from a recipe.

# %%
metrics = {
    "data": str(root), "preset": preset, "model": "tshsr", "model_config": config.model_config,
    "train_steps": run.result.step, "train_seconds": run.seconds, "test": m, "t2i_ceiling": ceiling,
    "query_caption": query, "query_rank_t2i": int(r_t2i[query]) + 1,
    "pointing": pointing, "pointing_hit_rate": float(np.mean([p["hit"] for p in pointing])) if pointing else None,
    "i2t_median_rank": float(np.median(ranks_i2t(sims)) + 1),
}
nbu.save_metrics(out, metrics, summary={"rsum": m["rsum"], "t2i_r1": m["t2i_r1"], "i2t_r1": m["i2t_r1"],
                                        "t2i_r1_ceiling": ceiling["t2i_r1"], "train_seconds": run.seconds})

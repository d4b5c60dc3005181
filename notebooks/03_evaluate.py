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
# # 03 · Evaluate checkpoints
#
# Scores one or more trained models (and score-averaging ensembles of them, such as SGRAF = SGR +
# SAF) on one split under a retrieval protocol, then looks past the headline numbers: recall at
# every K, how the ranks of individual queries are distributed, and which queries a model gets
# most right and most wrong.
#
# Protocols: `f30k` (Flickr30K 1K test), `coco1k` (5 folds of COCO `testall`), `coco5k`, `dev`,
# `scenes`, `generic`; see `docs/evaluation.md`. The defaults evaluate the three runs that
# `make demo` trains (`runs/scenes_demo_*`).

# %% tags=["parameters"]
output_dir: str = ""  # folder for metrics.json and figures (empty: reports/interactive/03_evaluate)
smoke: bool = False  # tiny data and fewer examples (the test suite's setting)
checkpoints: list = ["runs/scenes_demo_tshsr", "runs/scenes_demo_sgr", "runs/scenes_demo_saf"]  # checkpoint files or run folders (their best checkpoint)
labels: list = []  # display names, one per checkpoint (empty: model name and folder)
ensembles: list = [[1, 2]]  # groups of checkpoint positions whose scores are averaged (1 and 2: SGR + SAF, i.e. SGRAF)
data: str = "scenes:demo"  # "scenes:<preset>" (generated once, cached) or a precomp folder, e.g. data/f30k_precomp
scenes_dir: str = "data/scenes"  # cache folder of generated Scenes data sets (relative to the project root)
split: str = "test"  # split to score
protocol: str = "scenes"  # f30k, coco1k, coco5k, dev, scenes or generic
device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:K
batch_size: int = 128  # images or captions per encoding batch
n_queries: int = 3  # best and worst text queries shown for the first model
max_k: int = 50  # largest K of the recall curves

# %%
import matplotlib.pyplot as plt
import numpy as np

from thsrn_lib import notebook_utils as nbu
from thsrn_lib.checkpoint import load_model
from thsrn_lib.errors import ConfigError
from thsrn_lib.evaluation import evaluate, evaluate_protocol
from thsrn_lib.utils.device import resolve_device

if smoke:
    data, n_queries, max_k = "scenes:tiny", 2, 10
out = nbu.output_folder(output_dir, "03_evaluate")
root = nbu.resolve_data(data, scenes_dir)
dev = resolve_device(device)
if labels and len(labels) != len(checkpoints):
    raise ConfigError(f"labels has {len(labels)} names for {len(checkpoints)} checkpoints")

# %% [markdown]
# ## The models
# Each checkpoint carries its model's configuration and the vocabulary it was trained with; the
# captions are tokenized with that vocabulary.

# %%
loaded = [load_model(nbu.resolve_path(c), device=dev) for c in checkpoints]
names = list(labels) or [f"{lm.model_name} ({nbu.resolve_path(c).name})" for lm, c in zip(loaded, checkpoints)]
nbu.show_table([{"model": n, "type": lm.model_name, "parameters": sum(p.numel() for p in lm.model.parameters()),
                 "trained steps": lm.info.get("step"), "train best rsum": lm.info.get("best_rsum"),
                 "file": lm.info["path"]} for n, lm in zip(names, loaded)], index="model", floatfmt="{:.1f}")
nbu.cite(*dict.fromkeys(lm.model_name for lm in loaded))

# %% [markdown]
# ## Scores and metrics
# Every model scores all (image, caption) pairs of the split. An ensemble averages its members'
# score matrices, which is exactly what `evaluate([m1, m2], ...)` computes, without scoring again.

# %%
results, sims = {}, {}
for name, lm in zip(names, loaded):
    ds = nbu.open_split(root, split, vocab=lm.vocab)
    r = evaluate(lm.model, ds, protocol=protocol, batch_size=batch_size, progress=False)
    results[name] = {**r.metrics, "seconds": r.info["timing"]["total_s"]}
    sims[name] = r.sims
for group in ensembles:
    if len(group) < 2 or any(not 0 <= int(i) < len(loaded) for i in group):
        raise ConfigError(f"ensemble {group} must list at least two checkpoint positions in 0..{len(loaded) - 1}")
    members = [names[int(i)] for i in group]
    if any(loaded[int(i)].vocab != loaded[int(group[0])].vocab for i in group):
        raise ConfigError(f"ensemble {members}: the members were trained with different vocabularies")
    name = " + ".join(members)
    sims[name] = np.mean([np.asarray(sims[m]) for m in members], axis=0)
    results[name] = {**evaluate_protocol(sims[name], protocol), "seconds": sum(results[m]["seconds"] for m in members)}
cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr", "seconds"]
nbu.show_table([{"model": n, **{c: m[c] for c in cols}} for n, m in results.items()], index="model",
                       floatfmt="{:.1f}")

# %% [markdown]
# ## Recall at every K
# The table reports K = 1, 5, 10; the curves show the whole range. On Scenes the triangles mark the
# best text-to-image recall any model can reach, since many captions fit several images.

# %%
test_set = nbu.open_split(root, split, vocab=loaded[0].vocab)
ceiling = None
if nbu.is_scenes(root) and np.asarray(next(iter(sims.values()))).ndim == 2:
    from thsrn_lib.data.scenes import caption_ambiguity_ceiling

    c = caption_ambiguity_ceiling(root, split)
    ceiling = {k: c[f"t2i_r{k}"] for k in (1, 5, 10)}
ranks = {n: nbu.ranks_of(s) for n, s in sims.items()}
fig_curves = nbu.plot_recall_curves(ranks, max_k=max_k, ceiling=ceiling)
nbu.save_figure(fig_curves, out, "recall_at_k")

# %% [markdown]
# ## Ranks of individual queries
# The histograms show, for every query, the rank at which its ground truth was found (1 = top).
# Two models with the same R@1 can differ a lot in their tails.

# %%
fig_ranks = nbu.plot_rank_distributions(ranks)
nbu.save_figure(fig_ranks, out, "rank_distributions")
rank_stats = {n: {"i2t_mean_rank": float(r[0].mean() + 1), "t2i_mean_rank": float(r[1].mean() + 1),
                  "t2i_rank_p90": float(np.percentile(r[1] + 1, 90)), "t2i_worst_rank": int(r[1].max() + 1)}
              for n, r in ranks.items()}
nbu.show_table([{"model": n, **v} for n, v in rank_stats.items()], index="model", floatfmt="{:.1f}")

# %% [markdown]
# ## Best and worst text queries of the first model
# Best: found at rank 1 with the largest margin over the runner-up image. Worst: the caption whose
# image is ranked lowest. A green frame marks the caption's own image.

# %%
first = names[0]
s0 = np.asarray(sims[first])
if s0.ndim == 2:
    r_t2i = ranks[first][1]
    top2 = -np.sort(-s0, axis=0)[:2]  # (2, n_captions): best and runner-up scores per caption
    own = s0[np.arange(s0.shape[1]) // test_set.captions_per_image, np.arange(s0.shape[1])]
    margin = np.where(r_t2i == 0, own - top2[1], -np.inf)
    best = [int(k) for k in np.argsort(-margin, kind="stable")[:n_queries] if np.isfinite(margin[k])]
    worst = [int(k) for k in np.argsort(-r_t2i, kind="stable")[:n_queries]]
    picked = best + worst
    notes = [f"best, margin {margin[k]:.3f}" for k in best] + [f"worst, rank {r_t2i[k] + 1}" for k in worst]
    fig_q = nbu.text_to_image_figure(test_set, s0, picked, k=min(5, test_set.n_images), notes=notes)
    nbu.save_figure(fig_q, out, "best_worst_queries")
    queries = [{"caption": k, "note": n, "text": test_set.captions[k]} for k, n in zip(picked, notes)]
else:
    queries = []
    print("multi-fold protocol: query examples are shown for single-matrix protocols only")

# %% [markdown]
# ## Saved artifacts

# %%
metrics = {"data": str(root), "split": split, "protocol": protocol,
           "checkpoints": [lm.info["path"] for lm in loaded], "models": names, "results": results,
           "rank_stats": rank_stats, "t2i_ceiling": ceiling, "queries": queries}
best_name = max(results, key=lambda n: results[n]["rsum"])
nbu.save_metrics(out, metrics, summary={"best_model": best_name, "best_rsum": results[best_name]["rsum"],
                                        **{f"rsum[{n}]": m["rsum"] for n, m in results.items()}})

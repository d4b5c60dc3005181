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
#     display_name: thsrn
#     language: python
#     name: thsrn
# ---

# %% [markdown]
# # 06 · Attributions, and scoring interpretability against ground truth
#
# Attention says where a model looks; attribution says what its score depends on. With captum:
#
# * **per-token attribution** of a pair's score: LayerIntegratedGradients on the word-embedding
#   layer, from a baseline where every word is `<pad>` (`<start>`/`<end>` kept, lengths unchanged);
# * **per-region attribution**: IntegratedGradients on the region features (from the image's mean
#   region) and occlusion of single regions (replaced by zeros), all regions in one batched forward;
# * captum's **convergence delta** (sum of attributions minus the score difference they explain).
#
# Then the Scenes ground truth turns "the heat map looks right" into a number: **pointing
# accuracy**, the share of object words whose top-ranked region is one of their ground-truth
# regions, per model, stream, method and word type, beside chance.
#
# Models (papers): TSHSR — https://arxiv.org/abs/2203.05349 (reconstruction); SGR / SAF / SGRAF —
# https://arxiv.org/abs/2101.01368; SHAN — https://arxiv.org/abs/2106.06509 (reconstruction);
# HJE — https://doi.org/10.3233/IDA-230214 (reconstruction).

# %% tags=["parameters"]
output_dir: str = ""  # folder for metrics.json and the PNGs (empty: reports/interactive/06_attributions)
smoke: bool = False  # tiny Scenes data and small untrained models (the test suite's setting)
checkpoints: list = []  # checkpoint files or run folders (empty: every runs/scenes_demo_*/checkpoint_best.pt)
data: str = "scenes:demo"  # "scenes:<preset>" (generated once, cached) or a precomp folder (no pointing there)
scenes_dir: str = "data/scenes"  # cache folder of generated Scenes data sets (relative to the project root)
split: str = "test"  # split to score
example_caption: int = -1  # caption index to attribute; -1: the first caption with a relation phrase
ig_steps: int = 32  # integration steps for the example pair
pointing_steps: int = 16  # integration steps per word for pointing with integrated gradients
attribution_captions: int = 200  # captions scored with occlusion and integrated gradients (attention: all)
device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:K

# %%
# %matplotlib inline
import numpy as np
import torch
from IPython.display import display
from matplotlib.figure import Figure

from thsrn_lib import notebook_utils as nbu
from thsrn_lib import viz
from thsrn_lib.attribution import pair_attributions, region_occlusion
from thsrn_lib.explorer import find_checkpoints, load_models
from thsrn_lib.models import create
from thsrn_lib.pointing import format_pointing_table, pointing_accuracy
from thsrn_lib.utils.device import resolve_device
from thsrn_lib.viz import style

if smoke:  # tiny data, two small untrained models, few captions and steps
    data, attribution_captions, ig_steps, pointing_steps = "scenes:tiny", 10, 8, 4
    torch.set_num_threads(1)  # the test suite shares a small CPU: threads would only contend
out = nbu.output_folder(output_dir, "06_attributions")
torch.manual_seed(0)
root = nbu.resolve_data(data, scenes_dir)
ds = nbu.open_split(root, split)
dev = resolve_device(device)
has_gt = ds.alignments() is not None
print(ds, "" if has_gt else "\n(no ground-truth alignments: attributions only, no pointing accuracy)")

# %% [markdown]
# ## Models
# The trained demo checkpoints (`make demo`); in smoke mode small untrained models (their numbers
# sit near chance: the plumbing is what is tested). Without checkpoints outside smoke mode, run
# `make demo` (or notebook 05, which trains a fallback TSHSR) first.

# %%
if smoke:
    dims = dict(vocab_size=len(ds.vocab), img_dim=ds.feature_dim, num_regions=ds.num_regions)
    models = {"tshsr": create("tshsr", **dims, **nbu.tiny_model_config("tshsr")).to(dev).eval(),
              "hje": create("hje", **dims, **nbu.tiny_model_config("hje"), local_dim=32, global_dim=32).to(dev).eval()}
else:
    paths = [nbu.resolve_path(p) for p in checkpoints] or find_checkpoints("runs/scenes_demo_*/checkpoint_best.pt")
    paths = paths or sorted(nbu.project_root().glob("reports/*/05_alignments/fallback_tshsr/checkpoint_*.pt"))[:1]
    if not paths:
        raise SystemExit("no checkpoint: run `make demo` (or notebook 05, which trains a fallback TSHSR) first")
    models, _ = load_models(paths, device=dev, vocab=ds.vocab)
print("models:", ", ".join(models))
nbu.cite(*models)

# %% [markdown]
# ## 1 · One pair: attention next to attribution
# Top: each word's integrated-gradients share of the pair's score (red raises it). Below, for the
# object words: the model's attention over the regions (left) and the word's own region
# attribution (right): how much integrated gradients credit each region for the word's
# contribution to the score (the score minus the score with that word replaced by `<pad>`).

# %%
records = ds.alignments() or []
if example_caption < 0:
    example_caption = next((k for k, r in enumerate(records) if r.get("relations")), 0)
image_index = example_caption // 5
visual = viz.VisualContext.from_dataset(ds)
print(f"caption {example_caption}: “{ds.captions[example_caption]}” (image {image_index})")
deltas: dict[str, dict[str, float]] = {}
for name, model in models.items():
    att = pair_attributions(model, ds, image_index, caption_index=example_caption, n_steps=ig_steps)
    pair = viz.pair_maps(model, ds, image_index, caption_index=example_caption)
    n = len(att["ids"])
    region_attr = np.zeros((n, ds.num_regions))
    region_attr[1 : n - 1] = att["word_regions"].attributions
    tok = att["token"]
    deltas[name] = {"token_delta": float(abs(tok.delta[0])), "token_gap": float(tok.score[0] - tok.baseline_score[0]),
                    "region_delta": float(abs(att["regions"].delta[0])),
                    "region_gap": float(att["regions"].score[0] - att["regions"].baseline_score[0]),
                    "word_region_delta_mean": float(np.abs(att["word_regions"].delta).mean())}
    stream = "t2i" if "t2i" in pair.display else pair.streams[0]
    fig = viz.attention_vs_attribution(
        pair.tokens, pair.display[stream], tok.attributions[0], region_attr, image=visual.image(image_index),
        boxes=visual.boxes_of(image_index), gt_regions=pair.gt_regions,
        attention_label=f"{stream} attention" if pair.sources[stream] == "attention" else "local affinity",
        title=f"{name}: “{ds.captions[example_caption]}” (score {tok.score[0]:.3f}, token delta {tok.delta[0]:+.1e})")
    nbu.save_figure(fig, out, f"attention_vs_attribution_{name}")
    display(fig)
nbu.show_table([{"model": k, **v} for k, v in deltas.items()], floatfmt="{:.2e}")

# %% [markdown]
# Occlusion of single regions for the same pair (the score drop when a region's features are set
# to zero), next to the pair-level integrated gradients:

# %%
name0 = next(iter(models))
feats = ds.image_batch([image_index])[0]
occ = region_occlusion(models[name0], feats, ds.caption_ids(example_caption))
att0 = pair_attributions(models[name0], ds, image_index, caption_index=example_caption, n_steps=ig_steps,
                         positions=[])
fig = Figure(figsize=(8, 2.6), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
for ax, vals, label in ((ax1, occ.attributions[0], "occlusion: score drop"),
                        (ax2, att0["regions"].attributions[0], "integrated gradients (pair)")):
    norm = style.signed_norm(vals)
    ax.bar(np.arange(ds.num_regions), vals, color=[style.signed_cmap()(norm(v)) for v in vals])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(ds.num_regions))
    ax.set_xticklabels([f"r{r}" for r in range(ds.num_regions)], fontsize=6, rotation=90)
    ax.set_title(label, fontsize=9)
fig.suptitle(f"{name0}: per-region attribution of the pair score", fontsize=10)
nbu.save_figure(fig, out, f"regions_{name0}")
display(fig)

# %% [markdown]
# ## 2 · Pointing accuracy against the ground truth
# For every aligned word of every matched pair: is the top-ranked region one of the word's
# ground-truth regions (IoU >= 0.5 with the object it names)? Ties count as a random tie-break,
# so a uniform map scores exactly chance (= mean share of ground-truth regions among the R).
# Attention is scored on every caption of the split; occlusion and integrated gradients (one
# word-specific attribution per word) on the first `attribution_captions`.

# %%
results = []
for name, model in models.items() if has_gt else []:
    results.append(pointing_accuracy(model, ds, "attention", model_name=name))
    results.append(pointing_accuracy(model, ds, "occlusion", max_captions=attribution_captions, model_name=name))
    results.append(pointing_accuracy(model, ds, "integrated_gradients", max_captions=attribution_captions,
                                     n_steps=pointing_steps, model_name=name))
nbu.show_markdown(format_pointing_table(results) if results else "No ground-truth alignments in this data set.")

# %%
rows = [row for r in results for row in r.table() if row["type"] == "all"]
fig = Figure(figsize=(max(6.0, 0.55 * len(rows)), 3.4), layout="constrained")
ax = fig.add_subplot()
labels = [f"{r['model']}\n{r['method'][:5]}:{r['stream']}" for r in rows]
colours = [style.stream_color(r["stream"], i) if r["method"] == "attention" else style.NEUTRAL_COLOR
           for i, r in enumerate(rows)]
ax.bar(np.arange(len(rows)), [100 * r["accuracy"] for r in rows], color=colours)
ax.scatter(np.arange(len(rows)), [100 * r["chance"] for r in rows], marker="_", s=300, c="black", label="chance")
ax.set_xticks(np.arange(len(rows)))
ax.set_xticklabels(labels, fontsize=6, rotation=90)
ax.set_ylabel("pointing accuracy (%)")
ax.set_ylim(0, 100)
if rows:
    ax.legend(fontsize=8)
else:
    ax.text(0.5, 0.5, "no ground-truth alignments in this data set", ha="center", transform=ax.transAxes)
ax.set_title(f"pointing accuracy on Scenes {split} (all word types)", fontsize=10)
nbu.save_figure(fig, out, "pointing_accuracy")
display(fig)

# %%
metrics = {
    "data": str(root), "split": split, "models": list(models), "example_caption": example_caption,
    "example_deltas": deltas, "pointing": [r.to_dict() for r in results],
}
summary = {f"{row['model']}/{row['method']}/{row['stream']}": row["accuracy"] for row in rows}
summary["chance"] = rows[0]["chance"] if rows else float("nan")
nbu.save_metrics(out, metrics, summary=summary)
print("artifacts in", out)

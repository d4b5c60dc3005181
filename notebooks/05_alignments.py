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
# # 05 · Alignments: what the models look at
#
# Which regions does each word attend to, and which words does each region attend to? This
# notebook draws the maps the models compute while scoring a pair, on the Scenes demo test
# split, where every object word has ground-truth regions:
#
# 1. word-to-region attention (text-to-image stream) over the image, one panel per word, and
#    region-to-word attention (image-to-text stream), one panel per region;
# 2. the compact word x region heat map used when there is no image (real precomputed features);
# 3. the reasoning graph (edge weights between global, context and local nodes per step) and
#    the filtration / context-gate weights;
# 4. the two streams side by side: scores of correct vs. incorrect pairs, and where they disagree;
# 5. retrieval galleries with the ground truth marked;
# 6. the interactive explorer (JupyterLab), with its handler latency measured.
#
# Models (papers): TSHSR — Chen et al., "Two-stream Hierarchical Similarity Reasoning for
# Image-text Matching", https://arxiv.org/abs/2203.05349 (reconstruction); SGR / SAF / SGRAF —
# Diao et al., AAAI 2021, https://arxiv.org/abs/2101.01368; SHAN — Ji et al., IJCAI 2021,
# https://arxiv.org/abs/2106.06509 (reconstruction); HJE — Sun et al., Intelligent Data
# Analysis 2024, https://doi.org/10.3233/IDA-230214 (reconstruction; it has no attention: its
# "affinity" map is the word-region cosine in its local space).

# %% tags=["parameters"]
output_dir: str = ""  # folder for metrics.json and the PNGs (empty: reports/interactive/05_alignments)
smoke: bool = False  # tiny Scenes data and small untrained models (the test suite's setting)
checkpoints: list = []  # checkpoint files or run folders (empty: every runs/scenes_demo_*/checkpoint_best.pt)
data: str = "scenes:demo"  # "scenes:<preset>" (generated once, cached) or a precomp folder, e.g. data/f30k_precomp
scenes_dir: str = "data/scenes"  # cache folder of generated Scenes data sets (relative to the project root)
split: str = "test"  # split to explore
boxes: str = ""  # real data: an (n_images, R, 4) .npy of pixel boxes to draw over images (empty: the data's own)
image_dir: str = ""  # real data: folder with {image id}.png or .jpg (empty: the data's images/<split>)
fallback_steps: int = 400  # without any checkpoint: train a TSHSR for this many steps first (0: untrained)
example_caption: int = -1  # caption index to explain; -1: the first caption with a relation phrase
stream_images: int = 200  # images (and their captions) scored for the stream comparison
device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:K

# %%
# %matplotlib inline
import io
import time

import numpy as np
import torch
from IPython.display import display

from thsrn_lib import notebook_utils as nbu
from thsrn_lib import viz
from thsrn_lib.explorer import Explorer, ExplorerApp, find_checkpoints, load_models
from thsrn_lib.models import create
from thsrn_lib.utils.device import resolve_device

if smoke:  # tiny data, small untrained models, two models in the latency loop
    data, stream_images = "scenes:tiny", 12
    torch.set_num_threads(1)  # the test suite shares a small CPU: threads would only contend
out = nbu.output_folder(output_dir, "05_alignments")
torch.manual_seed(0)
root = nbu.resolve_data(data, scenes_dir)
ds = nbu.open_split(root, split)
dev = resolve_device(device)
visual = viz.VisualContext.from_dataset(ds, boxes=nbu.resolve_path(boxes) if boxes else None,
                                        image_dir=nbu.resolve_path(image_dir) if image_dir else None)
print(ds)

# %% [markdown]
# ## Models
# Trained checkpoints when there are any (`make demo` writes `runs/scenes_demo_*`); in smoke mode
# small untrained models of every kind (their maps are meaningless, the plumbing is what is
# tested). A score-level SGRAF ensemble is added when both SGR and SAF are present.

# %%
def small_models(ds):
    """Untrained models of every kind with small dimensions (smoke runs)."""
    dims = dict(vocab_size=len(ds.vocab), img_dim=ds.feature_dim, num_regions=ds.num_regions)
    extra = {"shan": {"word_init": "learned"}, "hje": {"local_dim": 32, "global_dim": 32}}
    return {name: create(name, **dims, **nbu.tiny_model_config(name), **extra.get(name, {})).to(dev).eval()
            for name in ("tshsr", "sgr", "saf", "shan", "hje")}


if smoke:
    models = small_models(ds)
else:
    paths = [nbu.resolve_path(p) for p in checkpoints] or find_checkpoints("runs/scenes_demo_*/checkpoint_best.pt")
    if not paths and fallback_steps > 0:
        from thsrn_lib.train import train

        print(f"no checkpoint found: training a TSHSR for {fallback_steps} steps (run `make demo` for the real ones)")
        cfg = nbu.train_config("tshsr", root, out / "fallback_tshsr",
                               model_config={"embed_size": 256, "word_dim": 300, "sim_dim": 128},
                               optim={"epochs": 100, "batch_size": 128, "warmup_steps": 150},
                               run={"max_steps": fallback_steps, "device": str(dev)})
        result = train(cfg, overwrite=True)
        paths = [result.best_checkpoint or result.last_checkpoint]
    models = load_models(paths, device=dev, vocab=ds.vocab)[0] if paths else small_models(ds)
print("models:", ", ".join(f"{k} ({sum(p.numel() for p in m.parameters()):,} parameters)" for k, m in models.items()))
nbu.cite(*models)

# %% [markdown]
# ## 1 · Word-to-region and region-to-word attention over the image
# Each panel is the image with every region box tinted by the word's weight on it (yellow =
# much); the top region is outlined white, the word's ground-truth regions dashed green, and the
# panel title says whether the top region is one of them (✓ / ✗).

# %%
records = ds.alignments() or []
if example_caption < 0:
    example_caption = next((k for k, r in enumerate(records) if r.get("relations")), 0)
image_index = example_caption // 5
print(f"caption {example_caption}: “{ds.captions[example_caption]}” (image {image_index})")
pairs = {name: viz.pair_maps(m, ds, image_index, caption_index=example_caption) for name, m in models.items()}
main_name = next((n for n, p in pairs.items() if "t2i" in p.word_region and "i2t" in p.word_region), next(iter(pairs)))
main = pairs[main_name]
first_stream = main.streams[0]
fig = viz.pair_attention(main, first_stream, visual, positions=main.content_positions())
nbu.save_figure(fig, out, f"word_to_region_{main_name}")
display(fig)

# %%
if "i2t" in main.region_word:
    fig = viz.pair_attention(main, "i2t", visual)
    nbu.save_figure(fig, out, f"region_to_word_{main_name}")
    display(fig)

# %% [markdown]
# Every other model on the same pair, in its last stream (image-to-text for SHAN, the member
# average for an ensemble; HJE's map is the local-space cosine):

# %%
for name, pair in pairs.items():
    if name == main_name or not pair.word_region:
        continue
    fig = viz.pair_attention(pair, pair.streams[-1], visual, positions=pair.content_positions()[:8])
    nbu.save_figure(fig, out, f"word_to_region_{name.replace(':', '_')}")
    display(fig)

# %% [markdown]
# ## 2 · Without images: the word x region heat map
# The real precomputed features (Flickr30K, MS-COCO) come without boxes or images. The views then
# fall back to this heat map and say so in the title (ground-truth cells framed green, each row's
# top region dotted). Pass `VisualContext.from_dataset(ds, boxes=..., image_dir=...)` to draw
# over your own images.

# %%
fig = viz.pair_attention(main, first_stream, viz.VisualContext())
nbu.save_figure(fig, out, "heatmap_fallback")
display(fig)

# %% [markdown]
# ## 3 · The reasoning graph and the gates
# Nodes: the global node (red), the context nodes of each level (purple, TSHSR's HSR) and the
# local nodes (blue: words for text-to-image, regions for image-to-text). Each node's strongest
# outgoing edges are drawn per reasoning step. The gate view shows each level's filtration /
# context-gate weights over the local nodes.

# %%
graph_name = next((n for n, p in pairs.items() if p.edges), None)
if graph_name is not None:
    gp = pairs[graph_name]
    fig = viz.pair_reasoning(gp, next(iter(gp.edges)))
    nbu.save_figure(fig, out, f"reasoning_graph_{graph_name}")
    display(fig)
    fig = viz.pair_reasoning(gp, next(iter(gp.edges)), kind="matrix")
    nbu.save_figure(fig, out, f"edge_matrices_{graph_name}")
    display(fig)
gate_name = next((n for n, p in pairs.items() if p.gates), None)
if gate_name is not None:
    fig = viz.pair_gates(pairs[gate_name])
    nbu.save_figure(fig, out, f"gates_{gate_name}")
    display(fig)

# %% [markdown]
# ## 4 · The streams side by side
# Partial scores of every (image, caption) pair of the first images: for TSHSR the text-to-image
# and image-to-text streams, for SHAN its three steps, for HJE its local and global spaces.

# %%
n_img = min(stream_images, ds.n_images)
stream_model = next((n for n in models if n in ("tshsr", "shan", "hje")), main_name)
mats = viz.part_score_matrices(models[stream_model], ds, image_indices=list(range(n_img)),
                               caption_indices=list(range(5 * n_img)))
parts = [k for k in mats if k != "score"]
fig = viz.stream_scores(mats, parts or ["score"], title=f"{stream_model}: partial scores on correct and incorrect pairs")
nbu.save_figure(fig, out, "stream_scores")
display(fig)
gt_mask = np.arange(n_img)[:, None] == (np.arange(5 * n_img)[None, :] // 5)
stream_gap = {k: float(v[gt_mask].mean() - v[~gt_mask].mean()) for k, v in mats.items()}
if len(parts) >= 2:
    fig = viz.stream_disagreement(mats, parts[0], parts[1], captions=ds.captions)
    nbu.save_figure(fig, out, "stream_disagreement")
    display(fig)
    nbu.show_table(viz.disagreements(mats, parts[0], parts[1], captions=ds.captions, k=8))

# %% [markdown]
# ## 5 · Retrieval galleries
# Top images for the example caption (its image framed green) with the caption's attention
# pooled over its words drawn on each; top captions for its image (its own five in green).

# %%
ex = Explorer(ds, models, visual=visual, top_k=8, caption_k=10)
ex.on_switch_model(main_name)
fig = ex.on_pick_caption(example_caption)
nbu.save_figure(fig, out, "gallery_images")
display(fig)
fig = ex.on_pick_image(image_index)
nbu.save_figure(fig, out, "gallery_captions")
display(fig)

# %% [markdown]
# ## 6 · The explorer
# Type a caption or pick one, pick an image from the ranking, click a word, switch model and
# stream. Each handler answers from embeddings cached once per model. Beyond 300 candidates
# (the 2,500 captions of the demo test split) ranking has two stages: the 300 nearest in the
# model's first-stage space get its full cross-attention score, the rest follow in first-stage
# order (`Explorer(shortlist=None)` scores everything, at a few seconds per click on a CPU).
# The timings below are measured here (handler + rendering the figure to PNG, as the browser
# would receive it).

# %%
def render_seconds(fig) -> float:
    t0 = time.perf_counter()
    fig.savefig(io.BytesIO(), format="png", dpi=72)
    return time.perf_counter() - t0


warm = ex.warm_up()
print("encoding the split once per model (s):", {k: round(v, 2) for k, v in warm.items()})
latency: dict[str, list[float]] = {}
for name in list(models)[: 2 if smoke else None]:
    steps = [("on_switch_model", lambda name=name: ex.on_switch_model(name)),
             ("on_query_text", lambda: ex.on_query_text("a red circle to the left of a blue square")),
             ("on_pick_caption", lambda: ex.on_pick_caption(example_caption)),
             ("on_pick_image", lambda: ex.on_pick_image(ex.state.image_ranking[0])),
             ("on_pick_word", lambda: ex.on_pick_word(2)),
             ("on_switch_stream", lambda: ex.on_switch_stream(ex.streams()[-1]))]  # its last stream
    for handler, call in steps:
        t0 = time.perf_counter()
        fig = call()
        total = time.perf_counter() - t0 + render_seconds(fig)
        latency.setdefault(handler, []).append(total)
latency_ms = {k: {"median": 1000 * float(np.median(v)), "max": 1000 * float(np.max(v))} for k, v in latency.items()}
nbu.show_table([{"handler": k, **v} for k, v in latency_ms.items()], floatfmt="{:.0f}")

# %%
app = ExplorerApp(ex)
display(app.widget)

# %%
nbu.save_metrics(out, {
    "data": str(root), "split": split, "models": list(models), "has_images": visual.missing(image_index) is None, "example_caption": example_caption,
    "explain_model": main_name, "pair_score": main.score, "stream_model": stream_model,
    "stream_gap": stream_gap, "explorer_latency_ms": latency_ms, "explorer_encode_s": warm,
}, summary={"models": len(models),
            "explorer_max_ms": max(v["max"] for v in latency_ms.values()),
            **{f"gap_{k}": v for k, v in stream_gap.items()}})
print("artifacts in", out)

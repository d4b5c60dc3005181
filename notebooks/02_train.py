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
# # 02 · Train a model from a recipe
#
# Trains any registered model (`tshsr`, `sgr`, `saf`, `shan`, `hje`) from a YAML recipe in
# `configs/`, with `key=value` overrides, exactly as `thsrn train --config ... key=value` does, while
# the loss and the validation recall redraw live. The run folder gets `checkpoint_best.pt` (best
# validation rsum), `checkpoint_last.pt` (for resuming), `metrics.jsonl` and the resolved
# `config.yaml`. Recipe keys are listed by `thsrn train --help` and in `docs/training.md`.
#
# Overrides are strings such as `"optim.epochs=3"`, `"optim.lr=1e-3"` or
# `"model_config.hsr_levels=2"` (values are read as YAML).

# %% tags=["parameters"]
output_dir: str = ""  # folder for metrics.json and figures (empty: reports/interactive/02_train)
smoke: bool = False  # tiny data, tiny model, two short epochs (the test suite's setting)
config: str = "configs/scenes_demo_tshsr.yaml"  # YAML recipe (relative to the project root)
overrides: list = []  # recipe overrides in the syntax of thsrn train (examples in the markdown above)
data: str = ""  # empty: the recipe's data.root; "scenes:<preset>" or a precomp folder replaces it
scenes_dir: str = "data/scenes"  # cache folder of generated Scenes data sets (relative to the project root)
run_dir: str = ""  # run folder for checkpoints and logs (empty: a "run" folder inside output_dir)
resume: bool = False  # continue the run found in run_dir instead of starting afresh

# %%
import matplotlib.pyplot as plt
import numpy as np

from thsrn_lib import notebook_utils as nbu
from thsrn_lib.evaluation import format_metrics_table
from thsrn_lib.train import TrainConfig

out = nbu.output_folder(output_dir, "02_train")
if smoke:  # two epochs on the tiny preset with a tiny model
    data = "scenes:tiny"
recipe = nbu.resolve_path(config)
cfg = TrainConfig.from_yaml(recipe, overrides)
if smoke:
    tiny = {f"model_config.{k}": v for k, v in nbu.tiny_model_config(cfg.model).items()}
    extra = [f"{k}={v}" for k, v in tiny.items()] + ["optim.epochs=2", "optim.batch_size=32", "optim.warmup_steps=3",
                                                    "run.log_every=2", "run.max_steps=null"]
    cfg = TrainConfig.from_yaml(recipe, [*overrides, *extra])
if data:
    cfg.data.root = str(nbu.resolve_data(data, scenes_dir))
cfg.run.output_dir = str(nbu.resolve_path(run_dir) if run_dir else out / "run")
cfg.run.progress = False
nbu.resolve_recipe_paths(cfg)
cfg.validate()
print(cfg.to_yaml())

# %% [markdown]
# ## The model
# The papers behind it, and its configuration. For the reconstructed models (TSHSR, SHAN, HJE) every
# choice the sources leave open is one of these options; results record their values.

# %%
from thsrn_lib.models import build_config

nbu.cite(cfg.model)
model_options = build_config(cfg.model, **cfg.model_config).to_dict()
nbu.show_table([{"option": k, "value": str(v)} for k, v in model_options.items()], index="option")

# %% [markdown]
# ## Training
# The left panel is the training loss per logging window (warm-up steps, which sum over all
# negatives, are drawn separately from hardest-negative steps). The other panels are the validation
# recalls and their sum, measured on the validation split at the end of every epoch (and every
# `run.val_every_steps` steps if set); the best rsum selects `checkpoint_best.pt`.

# %%
run = nbu.train_with_curves(cfg, title=f"{cfg.model} on {cfg.data.root}", resume=resume)
nbu.save_figure(run.figure, out, "training")
res = run.result
print(f"{res.step} steps, {res.epoch} epochs in {run.seconds:.0f} s; best rsum {res.best_rsum} "
      f"(epoch {res.best_epoch}); checkpoints in {res.output_dir}")

# %% [markdown]
# ## Throughput and the last validation

# %%
steps, pairs_s = run.series("train", "pairs_per_s")
fig_speed, ax = plt.subplots(figsize=(6, 3))
if len(steps):
    ax.plot(steps, pairs_s, marker="o", ms=3)
ax.set(xlabel="step", ylabel="captions per second", title="training throughput")
ax.grid(alpha=0.3)
nbu.save_figure(fig_speed, out, "throughput")
if res.last_val:
    print(format_metrics_table(res.last_val, title="last validation"))

# %% [markdown]
# ## Saved artifacts
# `metrics.json` records the resolved recipe (every switch value), the best and last validation
# metrics and where the checkpoints are; `03_evaluate` takes the run folder as input.

# %%
metrics = {
    "recipe": str(recipe), "overrides": overrides, "config": cfg.to_dict(), "model_options": model_options,
    "run_dir": str(res.output_dir), "best_checkpoint": res.best_checkpoint and str(res.best_checkpoint),
    "last_checkpoint": res.last_checkpoint and str(res.last_checkpoint), "steps": res.step, "epochs": res.epoch,
    "train_seconds": run.seconds, "best_rsum": res.best_rsum, "best_epoch": res.best_epoch, "last_val": res.last_val,
    "mean_pairs_per_s": float(np.mean(pairs_s)) if len(pairs_s) else None,
}
nbu.save_metrics(out, metrics, summary={"model": cfg.model, "best_rsum": res.best_rsum, "steps": res.step,
                                        "train_seconds": run.seconds})

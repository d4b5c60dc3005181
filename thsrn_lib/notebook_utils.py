"""Helpers shared by the notebooks in ``notebooks/`` (kept here so the notebooks stay thin).

Conventions every notebook follows:

- Its ``parameters`` cell declares ``output_dir: str = ""`` and ``smoke: bool = False``.
  :func:`output_folder` turns ``output_dir`` into the folder for the notebook's artifacts
  (``""`` -> ``reports/interactive/<notebook>/`` under the project root, for interactive use;
  the report runner always passes an explicit folder).
- ``smoke=True`` shrinks every size (Scenes ``tiny``, a few training steps) so that the test
  suite can execute the notebook in seconds; the notebook says what it changes.
- It ends with :func:`save_metrics` (``metrics.json``) and :func:`save_figure` (PNG files), both
  atomic, so a report never links a half-written file.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .utils.io import atomic_write

__all__ = [
    "project_root", "output_folder", "resolve_path", "save_figure", "save_metrics", "to_jsonable",
    "show_table", "show_markdown", "LiveCurves",
    "resolve_data", "is_scenes", "open_split", "model_options", "tiny_model_config",
    "TrainRun", "train_config", "train_with_curves", "resolve_recipe_paths", "ranks_of",
    "region_heatmap", "show_image", "caption_grid", "plot_recall_curves", "plot_rank_distributions",
    "text_to_image_figure", "image_to_text_rows", "PAPERS", "cite",
    "binding_scores", "TSHSR_ABLATIONS", "ablation_variants",
]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def project_root() -> Path:
    """The folder holding the ``thsrn_lib`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[1]


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if absolute, else relative to the project root (not to the kernel's cwd,
    which differs between JupyterLab, papermill and the test suite)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def output_folder(output_dir: str | Path | None, notebook: str) -> Path:
    """Create and return the notebook's artifact folder (see the module docstring)."""
    folder = resolve_path(output_dir) if output_dir else project_root() / "reports" / "interactive" / notebook
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _artifact_name(name: str, suffix: str) -> str:
    name = name if name.endswith(suffix) else name + suffix
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"artifact name {name!r} must be a plain file name (letters, digits, '_', '-', '.')")
    return name


def save_figure(fig, out_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``<out_dir>/<name>.png`` atomically and return the path.

    The figure stays open, so it is still displayed inline by the notebook afterwards.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    path = Path(out_dir) / _artifact_name(name, ".png")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj``: numpy/torch scalars and arrays become numbers and lists,
    dataclasses dicts, paths strings, and non-finite floats ``None`` (strict JSON has no NaN)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in metrics.json; convert it to numbers/strings first")


def save_metrics(out_dir: str | Path, metrics: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/metrics.json`` atomically and return the path.

    ``summary`` (a few headline numbers) is stored under the key ``"summary"``; the report's
    index shows it instead of the first scalars of ``metrics``.
    """
    data = dict(metrics)
    if summary is not None:
        data["summary"] = dict(summary)
    payload = to_jsonable(data)
    path = Path(out_dir) / "metrics.json"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, allow_nan=False)
        fh.write("\n")
    return path


def show_markdown(text: str) -> None:
    """Display markdown from code (e.g. a sentence with computed numbers)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def show_table(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], columns: Iterable[str] | None = None,
               floatfmt: str = "{:.2f}", index: str | None = None) -> None:
    """Display rows (dicts, or a dict of columns) as a table (floats formatted with ``floatfmt``)."""
    import pandas as pd
    from IPython.display import display

    df = pd.DataFrame(rows)
    if columns is not None:
        df = df[list(columns)]
    if index is not None:
        df = df.set_index(index)
    display(df.style.format(lambda v: floatfmt.format(v) if isinstance(v, float) else v))


class LiveCurves:
    """Curves that redraw in place while a loop runs (training loss, validation recall).

    ``update(step, loss=..., rsum=...)`` appends values; the figure is redrawn at most every
    ``every_s`` seconds (a display handle is updated, so the executed notebook keeps only the
    final figure). ``finish()`` draws the last state and returns the figure for saving.
    """

    def __init__(self, panels: Mapping[str, Sequence[str]], every_s: float = 2.0, title: str | None = None):
        import matplotlib.pyplot as plt

        self.panels = {k: list(v) for k, v in panels.items()}
        self.history: dict[str, tuple[list[float], list[float]]] = {
            s: ([], []) for series in self.panels.values() for s in series}
        self.every_s = every_s
        self._last = 0.0
        self.fig, axes = plt.subplots(1, len(self.panels), figsize=(4.5 * len(self.panels), 3.2), squeeze=False)
        self.axes = dict(zip(self.panels, axes[0]))
        if title:
            self.fig.suptitle(title)
        plt.close(self.fig)  # displayed through the handle only, not again at the end of the cell
        self._handle = None

    def update(self, step: float, **values: float) -> None:
        unknown = sorted(set(values) - set(self.history))
        if unknown:
            raise ConfigError(f"LiveCurves.update: unknown series {unknown}; declared: {sorted(self.history)}")
        for k, v in values.items():
            xs, ys = self.history[k]
            xs.append(float(step))
            ys.append(float(v))
        if time.monotonic() - self._last >= self.every_s:
            self._draw()

    def _draw(self) -> None:
        from IPython.display import display

        for panel, series in self.panels.items():
            ax = self.axes[panel]
            ax.clear()
            for s in series:
                xs, ys = self.history[s]
                if xs:
                    ax.plot(xs, ys, label=s, marker="o" if len(xs) < 30 else None, ms=3)
            ax.set_title(panel)
            ax.set_xlabel("step")
            if any(self.history[s][0] for s in series):
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        self.fig.tight_layout()
        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)
        self._last = time.monotonic()

    def finish(self):
        self._draw()
        return self.fig


# ------------------------------------------------------------------------------------------ data
def resolve_data(data: str, scenes_dir: str | Path = "data/scenes", seed: int = 0) -> Path:
    """The data folder a notebook parameter names.

    ``"scenes:<preset>"`` generates the built-in Scenes preset (``tiny``, ``demo``, ``full``) into
    ``scenes_dir`` (cached by parameter hash: the second call is instant) and returns its folder;
    anything else is a folder in the SCAN precomp layout (relative paths: from the project root).
    """
    from .errors import DataError

    if data.startswith("scenes:"):
        from .data.scenes import generate

        return generate(data.split(":", 1)[1], out=resolve_path(scenes_dir), seed=seed)
    root = resolve_path(data)
    if not root.is_dir():
        raise DataError(f"data folder {root} not found; pass data='scenes:demo' for the built-in benchmark or a "
                        "folder with {split}_caps.txt and {split}_ims.npy (SCAN precomp layout)")
    return root


def is_scenes(root: str | Path) -> bool:
    """Whether ``root`` is a generated Scenes data set (it then has images, boxes and alignments)."""
    meta = Path(root) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("generator") == "thsrn_lib.data.scenes"
    except (OSError, ValueError):
        return False


def open_split(root: str | Path, split: str, vocab: Any = None, max_captions: Any = "auto"):
    """A :class:`~thsrn_lib.data.PrecompDataset` of ``split``; ``vocab=None`` uses the data's own vocab
    file (pass a checkpoint's vocab when evaluating a model trained elsewhere)."""
    from .data import PrecompDataset, find_vocab

    return PrecompDataset(root, split, vocab if vocab is not None else find_vocab(root), max_captions=max_captions)


def model_options(model: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that the config of registered ``model`` has (so one set of shared
    options, e.g. dimensions, can be given to models with different switches)."""
    from .models import get_model_class

    names = {f.name for f in dataclasses.fields(get_model_class(model).config_class)}
    return {k: v for k, v in options.items() if k in names}


def tiny_model_config(model: str) -> dict[str, Any]:
    """Small dimensions for smoke runs of any registered model (only the fields it has)."""
    return model_options(model, {"embed_size": 32, "word_dim": 32, "sim_dim": 16, "hsr_levels": 2})


# ------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class TrainRun:
    """A finished training run as the notebooks use it."""

    result: Any  # thsrn_lib.train.TrainResult
    records: list[dict[str, Any]]  # every record the trainer emitted (train / val / epoch)
    figure: Any  # the final live-curve figure
    seconds: float

    @property
    def checkpoint(self) -> Path:
        """Best checkpoint if validation ran, else the last one."""
        best = self.result.best_checkpoint or self.result.last_checkpoint
        if best is None:
            raise ConfigError(f"training in {self.result.output_dir} wrote no checkpoint")
        return Path(best)

    def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one logged quantity, e.g. ``series("val", "rsum")``."""
        rows = [(r["step"], r[key]) for r in self.records if r.get("kind") == kind and r.get(key) is not None]
        return (np.array([s for s, _ in rows], dtype=float), np.array([v for _, v in rows], dtype=float))


def train_config(model: str, data_root: str | Path, run_dir: str | Path, model_config: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None, run: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None):
    """A validated :class:`~thsrn_lib.train.TrainConfig` from plain dicts (same keys as a YAML recipe)."""
    from .train import TrainConfig

    return TrainConfig.from_dict({
        "model": model,
        "model_config": dict(model_config or {}),
        "data": {"root": str(data_root), **(data or {})},
        "optim": dict(optim or {}),
        "run": {"progress": False, **(run or {}), "output_dir": str(run_dir)},
    })


_VAL_SERIES = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def resolve_recipe_paths(config) -> None:
    """Make the relative paths of a :class:`~thsrn_lib.train.TrainConfig` relative to the project root
    (recipes are written for commands run there; a notebook kernel runs in ``notebooks/``)."""
    config.data.root = str(resolve_path(config.data.root))
    if config.data.vocab not in ("", "auto"):
        config.data.vocab = str(resolve_path(config.data.vocab))
    if config.run.output_dir:
        config.run.output_dir = str(resolve_path(config.run.output_dir))


def train_with_curves(config, title: str | None = None, overwrite: bool = True, resume: bool = False,
                      every_s: float = 2.0) -> TrainRun:
    """Train with :func:`thsrn_lib.train.train` while live loss / validation-recall curves redraw.

    ``overwrite=True`` restarts a run folder that already holds a run (re-running a notebook
    cell should give the same result); ``resume=True`` continues it instead.
    """
    from .train import train

    # The warm-up sums the violations of all negatives, the rest uses the hardest one only: two
    # losses of different scale, drawn as two series so the switch is not mistaken for progress.
    curves = LiveCurves({"training loss": ["loss (all negatives)", "loss (hardest negative)"],
                         "validation recall (%)": list(_VAL_SERIES), "validation rsum": ["rsum"]},
                        every_s=every_s, title=title)
    records: list[dict[str, Any]] = []

    def on_record(kind: str, record: dict[str, Any]) -> None:
        if kind == "checkpoint":
            return
        records.append(dict(record))
        if kind == "train" and record.get("loss") is not None:
            series = "loss (hardest negative)" if record.get("hardest_negatives") else "loss (all negatives)"
            curves.update(record["step"], **{series: record["loss"]})
        elif kind == "val":
            curves.update(record["step"], **{k: record[k] for k in (*_VAL_SERIES, "rsum") if k in record})

    t0 = time.perf_counter()
    result = train(config, resume=resume, overwrite=overwrite and not resume, callbacks=[on_record], progress=False)
    seconds = time.perf_counter() - t0
    return TrainRun(result=result, records=records, figure=curves.finish(), seconds=seconds)


# ------------------------------------------------------------------------------------------ images
def region_heatmap(boxes: np.ndarray, weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` map: each pixel sums the weights of the region boxes covering it.

    boxes: ``(R, 4)`` pixel ``x1, y1, x2, y2`` (x2, y2 exclusive); weights: ``(R,)``.
    """
    b = np.asarray(boxes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    ys, xs = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    inside = ((ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None])
              & (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None]))  # (R, H, W)
    return np.tensordot(w, inside.astype(np.float64), axes=1)


def _load_image(dataset, i: int) -> np.ndarray | None:
    path = dataset.image_path(i)
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def show_image(ax, dataset, i: int, boxes: bool | Sequence[int] = False, heat: np.ndarray | None = None,
               title: str | None = None) -> None:
    """Draw image ``i`` of ``dataset`` on ``ax``: the picture if the data set has one (else its region
    features as a matrix), optionally region boxes (all, or the given indices) and a heatmap
    of region weights ``heat (R,)``."""
    img = _load_image(dataset, i)
    if img is None:
        ax.imshow(np.asarray(dataset.image_features(i)), aspect="auto", cmap="viridis")
        ax.set_xlabel("feature")
        ax.set_ylabel("region")
    else:
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        bx = dataset.boxes[i] if dataset.boxes is not None else None
        if heat is not None and bx is not None:
            hm = region_heatmap(bx, heat, img.shape[0], img.shape[1])
            ax.imshow(hm / (hm.max() + 1e-12), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        if boxes is not False and bx is not None:
            from matplotlib.patches import Rectangle

            idx = range(len(bx)) if boxes is True else boxes
            for r in idx:
                x1, y1, x2, y2 = bx[r]
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2,
                                       ec="cyan" if boxes is True else "lime"))
    if title:
        ax.set_title(title, fontsize=9)


def caption_grid(dataset, images: Sequence[int], boxes: bool = False, ncols: int = 3, width: int = 38):
    """A figure of images with their captions underneath (Scenes pictures, or feature matrices)."""
    import textwrap

    import matplotlib.pyplot as plt

    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 5.6 * nrows), squeeze=False)
    cpi = dataset.captions_per_image
    for ax, i in zip(axes.flat, images):
        show_image(ax, dataset, i, boxes=boxes, title=f"image {i}" + (f" ({dataset.image_ids[i]})" if dataset.image_ids else ""))
        caps = dataset.captions[i * cpi:(i + 1) * cpi]
        text = "\n".join(textwrap.fill(f"{j + 1}. {c}", width) for j, c in enumerate(caps))
        ax.text(0.0, -0.04, text, transform=ax.transAxes, va="top", ha="left", fontsize=7.5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ ranks
def plot_recall_curves(ranks: Mapping[str, tuple[np.ndarray, np.ndarray]], max_k: int = 50, ceiling: Mapping[int, float] | None = None):
    """R@K for K = 1..max_k, one line per model, image->text and text->image side by side.

    ranks: label -> ``(i2t ranks (n_images,), t2i ranks (n_captions,))``, 0-based.
    ceiling: optional ``{K: percent}`` t2i ceiling (Scenes caption ambiguity), drawn as markers.
    """
    import matplotlib.pyplot as plt

    from .evaluation import recall_at_k_curve

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for label, (r_i2t, r_t2i) in ranks.items():
        for ax, r in zip(axes, (r_i2t, r_t2i)):
            ks, rec = recall_at_k_curve(r, max_k=max_k)
            ax.plot(ks, rec, label=label)
    if ceiling:
        axes[1].plot(list(ceiling), list(ceiling.values()), "k^", ms=6, label="ceiling (ambiguous captions)")
    for ax, name in zip(axes, ("image -> text", "text -> image")):
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(f"{name}: R@K")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("recall (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_rank_distributions(ranks: Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """Histograms of the 1-based rank of every query (log-spaced bins), per direction and model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    top = max(int(max(np.max(a), np.max(b))) + 1 for a, b in ranks.values())
    bins = np.unique(np.geomspace(1, max(top, 2) + 1, 25).astype(int))
    for label, pair in ranks.items():
        for ax, r in zip(axes, pair):
            ax.hist(np.asarray(r) + 1, bins=bins, histtype="step", lw=1.5, label=label)
    for ax, name in zip(axes, ("image -> text queries", "text -> image queries")):
        ax.set_xscale("log")
        ax.set_xlabel("rank of the ground truth (1 = top)")
        ax.set_ylabel("queries")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ retrieval
def _frame(ax, colour: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def text_to_image_figure(dataset, sims: np.ndarray, captions: Sequence[int], k: int = 5,
                         notes: Sequence[str] | None = None):
    """For each query caption, its top-``k`` images by score (green frame: the caption's own image).

    sims: ``(n_images, n_captions)`` scores of ``dataset``'s split.
    """
    import textwrap

    import matplotlib.pyplot as plt

    sims = np.asarray(sims)
    cpi = dataset.captions_per_image
    fig, axes = plt.subplots(len(captions), k, figsize=(2.3 * k, 2.7 * len(captions)), squeeze=False)
    for row, c in enumerate(captions):
        order = np.argsort(-sims[:, c], kind="stable")[:k]
        for j, i in enumerate(order):
            ax = axes[row, j]
            show_image(ax, dataset, int(i), title=f"#{j + 1}  image {i}  ({sims[i, c]:.3f})")
            _frame(ax, "limegreen" if i == c // cpi else "lightgray")
        note = f" [{notes[row]}]" if notes else ""
        axes[row, 0].set_ylabel(textwrap.fill(f"caption {c}{note}: {dataset.captions[c]}", 34), fontsize=8,
                                rotation=0, ha="right", va="center", labelpad=10)
    fig.tight_layout()
    return fig


def image_to_text_rows(dataset, sims: np.ndarray, image: int, k: int = 5) -> list[dict[str, Any]]:
    """The top-``k`` captions for one image: rank, caption index, score, text, whether it is the image's own."""
    sims = np.asarray(sims)
    cpi = dataset.captions_per_image
    order = np.argsort(-sims[image], kind="stable")[:k]
    return [{"rank": j + 1, "caption": int(c), "score": float(sims[image, c]), "own caption": bool(c // cpi == image),
             "text": dataset.captions[c]} for j, c in enumerate(order)]


# ------------------------------------------------------------------------------------------ papers
#: The paper behind each registered model (TSHSR, SHAN and HJE are reconstructions from partial
#: sources: their numbers here are re-implementation numbers, never the papers').
PAPERS: dict[str, str] = {
    "tshsr": "R. Chen, H. Wang, L. Wang, S. Kwong. *Two-stream Hierarchical Similarity Reasoning for Image-text "
             "Matching.* arXiv:2203.05349, 2022. https://arxiv.org/abs/2203.05349 (reconstruction from the abstract)",
    "sgraf": "H. Diao, Y. Zhang, L. Ma, H. Lu. *Similarity Reasoning and Filtration for Image-Text Matching.* "
             "AAAI 2021. https://arxiv.org/abs/2101.01368",
    "shan": "Z. Ji, K. Chen, H. Wang. *Step-Wise Hierarchical Alignment Network for Image-Text Matching.* "
            "IJCAI 2021. https://arxiv.org/abs/2106.06509 (reconstruction)",
    "hje": "H. Sun, X. Qin, X. Liu. *Learning hierarchical embedding space for image-text matching.* Intelligent "
           "Data Analysis 28 (2024) 647-665. https://doi.org/10.3233/IDA-230214 (reconstruction)",
}
# Models that share a paper, or build on another model's paper.
_PAPER_OF = {"sgr": ["sgraf"], "saf": ["sgraf"], "sgraf": ["sgraf"], "tshsr": ["tshsr", "sgraf"],
             "shan": ["shan"], "hje": ["hje"]}


def cite(*models: str) -> list[str]:
    """Display (and return) the references of the papers behind ``models`` (registry names)."""
    keys: list[str] = []
    for m in models:
        for k in _PAPER_OF.get(m, []):
            if k not in keys:
                keys.append(k)
    refs = [PAPERS[k] for k in keys]
    if refs:
        show_markdown("**Papers.** " + " ".join(f"[{i + 1}] {r}" for i, r in enumerate(refs)))
    return refs


def ranks_of(sims: np.ndarray, captions_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """0-based ``(i2t (n_images,), t2i (n_captions,))`` ranks of a score matrix, or of a stack of fold
    blocks ``(folds, n, 5n)`` (COCO 1K; ranks of all folds concatenated)."""
    from .evaluation import ranks_i2t, ranks_t2i

    s = np.asarray(sims)
    blocks = [s] if s.ndim == 2 else list(s)
    return (np.concatenate([ranks_i2t(b, captions_per_image) for b in blocks]),
            np.concatenate([ranks_t2i(b, captions_per_image) for b in blocks]))


# ------------------------------------------------------------------------------------------ comparisons
#: TSHSR switch groups for ablations: group -> [(label, config overrides)]. Each variant changes one
#: reconstruction choice of ``TSHSRConfig`` (see the model's "reconstruction choices" page).
TSHSR_ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "streams": [("T2I stream only", {"streams": ["t2i"]}), ("I2T stream only", {"streams": ["i2t"]})],
    "levels": [("1 context level", {"hsr_levels": 1}), ("3 context levels", {"hsr_levels": 3})],
    "context": [("HSR-B contexts (phrases, soft clusters)", {"hsr": "B"}), ("no context (flat SGR steps)", {"hsr": "sgr"})],
    "fusion": [("learned fusion", {"fusion": "learned"}), ("MLP fusion", {"fusion": "mlp"})],
}


def ablation_variants(groups: Sequence[str], base: Mapping[str, Any],
                      reference: str = "TSHSR") -> dict[str, dict[str, Any]]:
    """``{label: {"model": "tshsr", "group": ..., **config}}``: the reference TSHSR with ``base`` options,
    then one variant per entry of the chosen :data:`TSHSR_ABLATIONS` groups. A variant identical to
    the reference (e.g. "3 context levels" when ``base`` already has 3) is left out."""
    unknown = [g for g in groups if g not in TSHSR_ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation group(s) {unknown}; valid groups: {list(TSHSR_ABLATIONS)}")
    out = {reference: {"model": "tshsr", "group": "reference", **base}}
    for g in groups:
        for label, change in TSHSR_ABLATIONS[g]:
            cfg = {**base, **change}
            if all(base.get(k) == v for k, v in change.items()):
                continue
            out[label] = {"model": "tshsr", "group": g, **cfg}
    return out


def binding_scores(model, root: str | Path, vocab, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every Scenes binding caption and of its attribute-swapped twin, with the caption's own image.

    Returns ``(true (n_captions,), swapped (n_captions,))``; feed them to
    :func:`thsrn_lib.data.scenes.binding_accuracy`. Images are scored ``chunk`` at a time against
    the captions of the chunk (only the block diagonal is kept).
    """
    import torch

    from .data import collate_texts
    from .data.scenes import load_swapped_captions

    ds = open_split(root, "binding", vocab=vocab)
    swapped = load_swapped_captions(root)
    cpi = ds.captions_per_image
    device = next(model.parameters()).device
    true_s, swap_s = np.empty(ds.n_captions, np.float32), np.empty(ds.n_captions, np.float32)
    model.eval()
    with torch.no_grad():
        for i0 in range(0, ds.n_images, chunk):
            i1 = min(ds.n_images, i0 + chunk)
            caps = range(i0 * cpi, i1 * cpi)
            items = [(ds.caption_ids(k), k) for k in caps] + [(vocab.encode(swapped[k]), k) for k in caps]
            txt = collate_texts(items).to(device)
            feats = ds.image_batch(range(i0, i1)).to(device)
            sims = model(feats, txt.ids, txt.lengths).float().cpu().numpy()  # (G, 2 G cpi)
            rows = np.repeat(np.arange(i1 - i0), cpi)
            cols = np.arange(len(caps))
            true_s[caps.start:caps.stop] = sims[rows, cols]
            swap_s[caps.start:caps.stop] = sims[rows, cols + len(caps)]
    return true_s, swap_s

"""The reasoning graph: edge weights between global, context and local nodes per step; gate weights.

* :func:`reasoning_graph`: one panel per reasoning step. ``kind="graph"`` lays the nodes out in
  rows (the global node on top, the context nodes of each level in the middle, the local nodes
  — words or regions — at the bottom) and draws each node's strongest outgoing edges as arrows
  (query → key; arcs between nodes of the same row) with width and colour by weight; ``kind="matrix"`` shows the edge matrices as heat maps with the node
  groups separated.
* :func:`gate_weights`: the filtration / context-gate weights per level over the local nodes.
* :func:`pair_reasoning` / :func:`pair_gates`: the same for a :class:`~thsrn_lib.viz.maps.PairMaps`.

Edge matrices are ``(P, P)`` with rows = queries (each row a softmax over keys), as the models
return them. Rows and columns of nodes that do not exist at a step (HSR-A contexts not yet
extracted) are all zero and are drawn faded.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from ..errors import ConfigError
from . import style
from .maps import PairMaps

__all__ = ["reasoning_graph", "gate_weights", "pair_reasoning", "pair_gates", "node_labels"]


def _group_kind(name: str) -> str:
    base = name.split(":")[0]
    return base if base in style.NODE_COLORS else "context"


def node_labels(groups: Sequence[tuple[str, int]], local_labels: Sequence[str] | None = None) -> list[str]:
    """One label per node: ``G``, ``C1.0`` (level 1, node 0), then the local labels (or ``l0 ..``)."""
    labels: list[str] = []
    for name, size in groups:
        kind = _group_kind(name)
        if kind == "global":
            labels += ["G"] if size == 1 else [f"G{i}" for i in range(size)]
        elif kind == "local":
            loc = list(local_labels) if local_labels is not None else [f"l{i}" for i in range(size)]
            if len(loc) < size:
                loc += [f"l{i}" for i in range(len(loc), size)]
            labels += [style.short_label(t, 10) for t in loc[:size]]
        else:
            level = name.split(":")[1] if ":" in name else name
            labels += [f"C{level}.{i}" for i in range(size)]
    return labels


def _layout(groups: Sequence[tuple[str, int]]) -> np.ndarray:
    """``(P, 2)`` node positions: global on top, contexts by level in between, locals at the bottom."""
    contexts = [g for g in groups if _group_kind(g[0]) == "context"]
    n_rows = 2 + len(contexts)
    pos = []
    ctx_row = 0
    width = max(size for _, size in groups)
    for name, size in groups:
        kind = _group_kind(name)
        if kind == "global":
            y = n_rows - 1
        elif kind == "local":
            y = 0
        else:
            ctx_row += 1
            y = n_rows - 1 - ctx_row
        xs = np.linspace(0, width - 1, size) if size > 1 else np.array([(width - 1) / 2])
        pos += [(x, y) for x in xs]
    return np.asarray(pos, dtype=np.float64)


def _check(edges: Sequence[Any], groups: Sequence[tuple[str, int]]) -> list[np.ndarray]:
    mats = [np.asarray(e, dtype=np.float64) for e in edges]
    if not mats:
        raise ConfigError("no edge matrices: this model/stream has no reasoning graph (SAF, SHAN and HJE have none)")
    p = sum(int(s) for _, s in groups)
    for m in mats:
        if m.shape != (p, p):
            raise ConfigError(f"edge matrices must be (P, P) with P = {p} nodes of the layout {list(groups)}, got {m.shape}")
    return mats


def reasoning_graph(edges: Sequence[Any], groups: Sequence[tuple[str, int]], local_labels: Sequence[str] | None = None,
                    kind: str = "graph", top_k: int = 2, steps: Sequence[int] | None = None, title: str | None = None,
                    save_to: str | os.PathLike | None = None) -> Figure:
    """Edge weights of every reasoning step.

    Args:
        edges: per step a ``(P, P)`` matrix (rows = queries).
        groups: node groups in order, ``[("global", 1), ("context:1", 1), ..., ("local", n)]``.
        local_labels: names of the local nodes (the words or ``r0 ..``).
        kind: ``"graph"`` (node-link drawing, each node's ``top_k`` strongest outgoing edges) or
            ``"matrix"`` (heat maps).
        steps: which steps to draw (default all).
    """
    if kind not in ("graph", "matrix"):
        raise ConfigError(f"kind must be 'graph' or 'matrix', got {kind!r}")
    mats = _check(edges, groups)
    steps = list(range(len(mats))) if steps is None else [int(s) for s in steps]
    labels = node_labels(groups, local_labels)
    colours = [style.NODE_COLORS[_group_kind(n)] for n, s in groups for _ in range(int(s))]
    vmax = max(float(mats[s].max()) for s in steps)
    norm = style.weight_norm([vmax])
    cmap = style.weight_cmap()
    p = len(labels)
    if kind == "matrix":
        fig, axes = style.new_figure(len(steps), ncols=min(3, len(steps)), panel_size=(0.9 + 0.28 * p, 0.7 + 0.28 * p))
        im = None
        for ax, s in zip(axes, steps):
            im = ax.imshow(mats[s], cmap=cmap, norm=norm)
            bounds = np.cumsum([int(sz) for _, sz in groups])[:-1] - 0.5
            for b in bounds:
                ax.axhline(b, color="white", linewidth=1.2)
                ax.axvline(b, color="white", linewidth=1.2)
            ax.set_xticks(range(p))
            ax.set_yticks(range(p))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_yticklabels(labels, fontsize=6)
            for tick, c in zip(ax.get_yticklabels(), colours):
                tick.set_color(c)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
            ax.set_title(f"step {s + 1}", fontsize=9)
            ax.set_label("panel")
        style.colorbar(fig, im, list(axes), "edge weight")
        return style.finish(fig, save_to, title)

    xy = _layout(groups)
    width = float(xy[:, 0].max()) + 1
    height = float(xy[:, 1].max()) + 1
    fig, axes = style.new_figure(len(steps), ncols=1, panel_size=(max(5.0, 0.55 * width), 1.2 + 0.7 * height))
    for ax, s in zip(axes, steps):
        m = mats[s]
        alive = (m.sum(axis=1) > 0) | (m.sum(axis=0) > 0)
        for q in range(p):
            if not alive[q]:
                continue
            for k in np.argsort(-m[q])[: max(1, top_k)]:
                if k == q or m[q, k] <= 0:
                    continue
                same_row = xy[q, 1] == xy[k, 1]
                ax.add_patch(FancyArrowPatch(
                    tuple(xy[q]), tuple(xy[k]), arrowstyle="-|>", mutation_scale=7, shrinkA=6, shrinkB=6,
                    connectionstyle=f"arc3,rad={0.35 if same_row else 0.08}", color=cmap(norm(m[q, k])),
                    linewidth=0.6 + 3.0 * m[q, k] / max(vmax, 1e-12), alpha=0.85, zorder=1, gid="edge"))
        ax.scatter(xy[:, 0], xy[:, 1], s=150, c=colours, alpha=np.where(alive, 1.0, 0.2), zorder=2,
                   edgecolors="black", linewidths=0.5)
        for (x, y), lab in zip(xy, labels):
            if y == 0:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(0, -9), ha="center", va="top",
                            fontsize=6.5, rotation=90)
            else:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(9, 0), ha="left", va="center", fontsize=6.5)
        ax.set_xlim(-0.8, width - 0.2)
        ax.set_ylim(-1.6, height - 0.4)
        ax.axis("off")
        ax.set_title(f"step {s + 1}: each node's {top_k} strongest outgoing edges (arrow: query → key)", fontsize=9)
        ax.set_label("panel")
    from matplotlib.cm import ScalarMappable

    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=min(0.9, 1.6 / len(axes)), aspect=30)
    cb.set_label("edge weight", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return style.finish(fig, save_to, title)


def gate_weights(gates: Sequence[Any], labels: Sequence[str], title: str | None = None, what: str = "word",
                 save_to: str | os.PathLike | None = None) -> Figure:
    """Gate / filtration weights ``levels x local nodes`` as a heat map (one row per level)."""
    import seaborn as sns

    rows = [np.asarray(g, dtype=np.float64).reshape(-1) for g in gates]
    if not rows:
        raise ConfigError("no gate weights: this model/stream has no filtration or context gates")
    if any(r.shape[0] != len(labels) for r in rows):
        raise ConfigError(f"every gate vector needs {len(labels)} values (one per {what}), got {[r.shape[0] for r in rows]}")
    arr = np.stack(rows)
    fig = Figure(figsize=(1.5 + 0.42 * arr.shape[1], 1.0 + 0.42 * arr.shape[0]), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(arr, ax=ax, cmap=style.weight_cmap(), norm=style.weight_norm(arr), annot=arr.shape[1] <= 24,
                fmt=".2f", annot_kws={"fontsize": 6}, xticklabels=[style.short_label(t, 10) for t in labels],
                yticklabels=[f"level {i + 1}" for i in range(arr.shape[0])], cbar_kws={"label": "gate weight"})
    ax.set_label("panel")
    ax.set_xlabel(what, fontsize=8)
    ax.tick_params(labelsize=7)
    return style.finish(fig, save_to, title)


def _local_labels(pair: PairMaps, stream: str) -> list[str]:
    if stream.split(":")[-1] == "t2i":
        return list(pair.tokens)
    return [f"r{r}" for r in range(pair.num_regions)]


def pair_reasoning(pair: PairMaps, stream: str | None = None, kind: str = "graph", top_k: int = 2,
                   save_to: str | os.PathLike | None = None) -> Figure:
    """:func:`reasoning_graph` of a pair (``stream`` default: the first with edges)."""
    if not pair.edges:
        raise ConfigError("this model has no reasoning graph (only SGR and TSHSR return edge weights)")
    stream = stream or next(iter(pair.edges))
    if stream not in pair.edges:
        raise ConfigError(f"no edges for stream {stream!r}; available: {list(pair.edges)}")
    title = f"{stream} reasoning graph — “{pair.caption}”" if pair.caption else f"{stream} reasoning graph"
    return reasoning_graph(pair.edges[stream], pair.node_groups[stream], _local_labels(pair, stream), kind=kind,
                           top_k=top_k, title=title, save_to=save_to)


def pair_gates(pair: PairMaps, stream: str | None = None, save_to: str | os.PathLike | None = None) -> Figure:
    """:func:`gate_weights` of a pair (``stream`` default: the first with gates)."""
    if not pair.gates:
        raise ConfigError("this model has no filtration / context gates (SAF, TSHSR and SHAN have them)")
    stream = stream or next(iter(pair.gates))
    if stream not in pair.gates:
        raise ConfigError(f"no gates for stream {stream!r}; available: {list(pair.gates)}")
    words = stream.split(":")[-1] == "t2i"
    title = f"{stream} gate weights per level — “{pair.caption}”" if pair.caption else f"{stream} gate weights"
    return gate_weights(pair.gates[stream], _local_labels(pair, stream), title=title,
                        what="word" if words else "region", save_to=save_to)

"""Analytic FLOP counts per (image, caption) pair of the scoring path (encoders excluded).

One multiply-add = 2 FLOPs. Element-wise work (norms, softmax, activations) is O(n D) per pair
against O(R n D) for the products, so it is left out: the counts are the GEMM work of the
algorithm, which is what a fraction of the matmul peak should be compared with.

Notation: R regions, n words (incl. <start>/<end>), D joint size, S similarity size.
"""
from __future__ import annotations


def _sgr_steps(nodes: float, s: int, steps: int) -> float:
    # per step: query and key projections, value projection (2 + 1) P S^2, then Q K^T and E X: 2 P^2 S
    return steps * (3 * nodes * s * s + 2 * nodes * nodes * s)


def t2i_stream_macs(r: int, n: float, d: int, s: int) -> float:
    """Word-centred stream: logits R n D, context n R D, local projection n D S, global D S."""
    return r * n * d + n * r * d + n * d * s + d * s


def _folded_sgr_steps(nodes: float, s: int, steps: int) -> float:
    # SGRStep as executed: folded query/key projection and value projection 2 P S^2, Q K^T and E X
    # 2 P^2 S; the last step updates node 0 only (2 S^2 + 2 P S).
    return (steps - 1) * (2 * nodes * s * s + 2 * nodes * nodes * s) + (2 * s * s + 2 * nodes * s)


def sgr_flops(r: int = 36, n: float = 15.5, d: int = 1024, s: int = 256, steps: int = 3, folded: bool = True) -> float:
    """FLOPs per pair of SGR: ``folded`` = as the fast path computes it, else the official algorithm."""
    graph = _folded_sgr_steps(n + 1, s, steps) if folded else _sgr_steps(n + 1, s, steps)
    return 2 * (t2i_stream_macs(r, n, d, s) + graph + s)


def saf_flops(r: int = 36, n: float = 15.5, d: int = 1024, s: int = 256) -> float:
    macs = t2i_stream_macs(r, n, d, s) + 2 * (n + 1) * s + s  # gate logits + weighted sum
    return 2 * macs


def tshsr_flops(r: int = 36, n: float = 15.5, d: int = 1024, s: int = 256, levels: int = 3) -> float:
    """Two streams with HSR-A (default config). The region-word logits are shared by both streams."""
    logits = r * n * d
    t2i = n * r * d + n * d * s + d * s  # context, local and global projections
    i2t = r * n * d + r * d * s + d * s
    hsr = 0.0
    for local in (n, r):
        for h in range(1, levels + 1):
            nodes = 1 + h + local
            step = _folded_sgr_steps(nodes, s, 1) if h == levels else _folded_sgr_steps(nodes, s, 2) - _folded_sgr_steps(nodes, s, 1)
            hsr += local * s + local * s + step  # gate, pooling, one (folded) SGR step
        hsr += s
    return 2 * (logits + t2i + i2t + hsr)


FLOPS = {"sgr": sgr_flops, "saf": saf_flops, "tshsr": tshsr_flops}

"""Spectral diagnostics of the paper (Figures 1-3) and their plots.

* Figure 1: per adapted layer, ``σ_max(W_pre) / σ_max(ΔW)`` with ``ΔW = scaling·B·A``
  (or ``W_ft − W_pre`` for full fine-tuning).
* Figure 2: per layer, the maximum |cosine| between the leading left (and right) singular
  vector of ΔW and the top-``k`` (32) left (right) singular vectors of W_pre.
* Figure 3: a global post-training scale ``s`` applied to the layers that the rescaling
  touches (the last ``rescale_layers`` blocks), swept against CA and ASR.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from rora_fast.atomic import save_figure, write_json as _write_json

__all__ = ["delta_stats", "plot_layer_stats", "plot_scale_sweep"]


def delta_stats(pairs: Sequence, k: int = 32) -> List[Dict]:
    """``pairs``: iterable of ``(name, W_pre, ΔW)``.  Returns one dict per layer."""
    from rora_fast import block_index
    rows = []
    for name, W, D in pairs:
        W = W.double()
        D = D.double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        sd = torch.linalg.svdvals(D)
        s_delta = float(sd[0]) if sd.numel() else 0.0
        if s_delta > 0:
            Ud, _, Vdh = torch.linalg.svd(D, full_matrices=False)
            kk = min(k, U.shape[1])
            cos_u = float((U[:, :kk].T @ Ud[:, 0]).abs().max())
            cos_v = float((Vh[:kk] @ Vdh[0]).abs().max())
        else:
            cos_u = cos_v = float("nan")
        rows.append({"name": name, "block": block_index(name), "sigma_pre": float(S[0]),
                     "sigma_delta": s_delta,
                     "ratio": float(S[0]) / s_delta if s_delta > 0 else float("inf"),
                     "max_cos_left": cos_u, "max_cos_right": cos_v})
    return rows


def _short(name: str) -> str:
    """``bert.encoder.layer.5.attention.output.dense`` -> ``5.attn_out``."""
    import re
    m = re.search(r"(?:layer|layers|h|block|blocks)\.(\d+)\.(.*)$", name)
    if not m:
        return ".".join(name.split(".")[-2:])
    tail = m.group(2)
    for a, b in (("attention.self.", ""), ("attention.output.dense", "attn_out"),
                 ("intermediate.dense", "ffn_in"), ("output.dense", "ffn_out"),
                 ("self_attn.", ""), ("mlp.", "")):
        tail = tail.replace(a, b)
    return f"{m.group(1)}.{tail}"


def plot_layer_stats(stats: Dict[str, List[Dict]], path: str, key: str, ylabel: str,
                     title: str, log: bool = False) -> None:
    """One bar group per layer, one bar per method (``stats``: method -> rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(stats)
    names = [r["name"] for r in stats[methods[0]]]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) * max(1, len(methods))), 4))
    w = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        by = {r["name"]: r[key] for r in stats[m]}
        xs = [i + j * w for i in range(len(names))]
        ax.bar(xs, [by.get(n, float("nan")) for n in names], width=w, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))])
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_ca_asr_curves(sweeps: Dict[str, List[Dict]], path: str, title: str, x: str,
                       xlabel: str, ylabel: str = "%", log2_x: bool = False) -> None:
    """``sweeps``: method -> [{x: ..., "CA": ..., "ASR": ...}]; CA solid, ASR dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rows in sweeps.items():
        xs = [r[x] for r in rows]
        line, = ax.plot(xs, [r["CA"] for r in rows], "-o", label=f"{m} CA")
        ax.plot(xs, [r["ASR"] for r in rows], "--s", color=line.get_color(), label=f"{m} ASR")
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_scale_sweep(sweeps: Dict[str, List[Dict]], path: str, title: str) -> None:
    """``sweeps``: method -> [{"s":..., "CA":..., "ASR":...}]; CA solid, ASR dashed."""
    plot_ca_asr_curves(sweeps, path, title, "s",
                       "post-training scale s (last rescaled blocks)", log2_x=True)


def write_json(obj, path: str) -> None:
    """The harness's result files: :func:`rora_fast.atomic.write_json` (atomic), numpy
    and torch scalars written as floats."""
    _write_json(path, obj, indent=1, default=float)

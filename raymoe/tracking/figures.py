"""PNG figures of a run's specialization: expert x class heatmaps, expert usage, gate-entropy histogram.

Built on matplotlib's object API with the Agg canvas (no pyplot state, safe in Ray workers without a display).
Input: `SpecializationAccumulator.matrices()`; token-level models prefix each MoE layer's arrays with
"<layer>/" (e.g. "layer1/counts_true_EC"), giving one set of figures per layer.
Shape legend: E experts, C classes.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_BASES = ("counts_true_EC", "counts_pred_EC", "usage_E", "entropy_hist")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def expert_class_heatmap(counts_EC: np.ndarray, title: str, class_axis: str) -> Figure:
    """Rows = experts, columns = classes; each cell the number of samples the gate sent to that expert."""
    counts_EC = np.asarray(counts_EC, dtype=float)
    E, C = counts_EC.shape
    fig = _figure(min(2 + 0.5 * C, 20), min(1.5 + 0.45 * E, 12))
    ax = fig.add_subplot()
    image = ax.imshow(counts_EC, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel(class_axis)
    ax.set_ylabel("expert (argmax of the gate)")
    ax.set_title(title)
    if C <= 20:
        ax.set_xticks(range(C))
    if E <= 20:
        ax.set_yticks(range(E))
    if C <= 20 and E <= 20:  # numbers only where they stay readable
        top = counts_EC.max() if counts_EC.size else 0
        for e in range(E):
            for c in range(C):
                ax.text(c, e, f"{int(counts_EC[e, c])}", ha="center", va="center", fontsize=7,
                        color="black" if counts_EC[e, c] > 0.6 * top else "white")
    return fig


def usage_bars(usage_E: np.ndarray, title: str) -> Figure:
    """Each expert's share of the summed gate probabilities; the dashed line is perfectly balanced use (1/E)."""
    usage_E = np.asarray(usage_E, dtype=float)
    share_E = usage_E / usage_E.sum() if usage_E.sum() > 0 else usage_E
    E = len(share_E)
    fig = _figure(min(2 + 0.4 * E, 16), 3.2)
    ax = fig.add_subplot()
    ax.bar(range(E), share_E, color="tab:blue")
    ax.axhline(1.0 / max(E, 1), color="gray", linestyle="--", linewidth=1, label="balanced")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of gate probability mass")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def entropy_histogram(hist: np.ndarray, num_experts: int, title: str, edges: np.ndarray | None = None) -> Figure:
    """Histogram of the per-sample gate entropy in bits, from 0 (hard routing) to log2 E (uniform gate)."""
    hist = np.asarray(hist, dtype=float)
    top = math.log2(num_experts) if num_experts > 1 else 1.0
    edges = np.linspace(0.0, top, len(hist) + 1) if edges is None else np.asarray(edges, dtype=float)
    fig = _figure(5, 3.2)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="tab:orange", edgecolor="white")
    ax.set_xlabel("gate entropy per sample (bits)")
    ax.set_ylabel("samples")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(title)
    return fig


def _groups(matrices: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"": {...}} for sample-level models, {"layer1/": {...}, ...} for per-layer arrays."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in matrices.items():
        prefix, _, base = key.rpartition("/")
        groups.setdefault(f"{prefix}/" if prefix else "", {})[base] = value
    return groups


def specialization_figures(matrices: dict[str, np.ndarray], split: str = "test") -> dict[str, Figure]:
    """Artifact path -> Figure for every group of arrays that has them."""
    out: dict[str, Figure] = {}
    for prefix, arrays in _groups(matrices).items():
        where = f" ({prefix.rstrip('/')})" if prefix else ""
        folder = f"figures/{prefix}"
        counts_true = arrays.get("counts_true_EC")
        if counts_true is not None:
            out[f"{folder}expert_class_true.png"] = expert_class_heatmap(
                counts_true, f"{split}: expert x true class{where}", "true class")
        counts_pred = arrays.get("counts_pred_EC")
        if counts_pred is not None:
            out[f"{folder}expert_class_pred.png"] = expert_class_heatmap(
                counts_pred, f"{split}: expert x class predicted by the selected expert{where}", "predicted class")
        usage = arrays.get("usage_E")
        if usage is None and counts_true is not None:
            usage = np.asarray(counts_true).sum(axis=1)
        if usage is not None:
            out[f"{folder}expert_usage.png"] = usage_bars(usage,
                                                          f"{split}: expert usage (mean gate probability){where}")
        hist = arrays.get("entropy_hist")
        if hist is not None:
            num_experts = len(usage) if usage is not None else 2
            out[f"{folder}gate_entropy.png"] = entropy_histogram(
                hist, num_experts, f"{split}: per-sample gate entropy{where}", arrays.get("entropy_edges"))
    return out


def _token_label(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([int(token_id)])
    return repr(text)[1:-1][:8] or str(token_id)


def load_over_training(history: list[dict], layer: int | None, num_experts: int, x_label: str = "optimizer step"
                       ) -> Figure:
    """Each expert's share of routed items of one MoE layer (None: the sample-level gate) at every evaluation
    (dashed: balanced, 1/E; dotted: the dead-expert line, 1/(10E))."""
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    prefix = "" if layer is None else f"layer{layer}/"
    for e in range(num_experts):
        ax.plot(steps, [h.get(f"{prefix}load_share/{e}", math.nan) for h in history], marker=".",
                label=f"expert {e}")
    ax.axhline(1.0 / max(num_experts, 1), color="gray", linestyle="--", linewidth=1)
    ax.axhline(0.1 / max(num_experts, 1), color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel(x_label)
    ax.set_ylabel("share of routed items")
    ax.set_title("gate: expert load over training" if layer is None else
                 f"MoE layer {layer}: expert load over training")
    if num_experts <= 16:
        ax.legend(fontsize=7, ncol=2)
    return fig


def routing_stability(history: list[dict], layers: list[int | None], x_label: str = "epoch") -> Figure:
    """Churn (items whose top-1 expert changed since the previous evaluation) and the adjusted mutual information
    between the two assignments, per layer, over training (docs/observatory.md)."""
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    steps = [h["step"] for h in history]
    for layer in layers:
        prefix, name = ("", "gate") if layer is None else (f"layer{layer}/", f"layer {layer}")
        for key, style in (("routing_churn", "-"), ("routing_ami", "--")):
            # one MoE layer reports only the top-level keys
            ax.plot(steps, [h.get(f"{prefix}{key}", h.get(key, math.nan) if len(layers) == 1 else math.nan)
                            for h in history], marker=".", linestyle=style,
                    label=f"{name}: {'churn' if key == 'routing_churn' else 'AMI'}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(x_label)
    ax.set_ylabel("fraction / AMI")
    ax.set_title("routing stability: churn (solid) and AMI with the previous evaluation (dashed)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def routing_figures(history: list[dict], num_experts: int, x_label: str = "epoch") -> dict[str, Figure]:
    """The observatory's figures of a run so far (every MoE model): load per layer and routing stability."""
    last = history[-1] if history else {}
    layers: list[int | None] = sorted({int(k.split("/")[0][5:]) for k in last if k.startswith("layer")
                                       and k.endswith("load_share/0")})
    if not layers and "load_share/0" in last:
        layers = [None]
    out = {}
    for layer in layers:
        name = "figures/load_over_training.png" if layer is None else f"figures/layer{layer}/load_over_training.png"
        out[name] = load_over_training(history, layer, num_experts, x_label=x_label)
    if layers and any("routing_churn" in h for h in history):
        out["figures/routing_stability.png"] = routing_stability(history, layers, x_label=x_label)
    return out


def lm_figures(matrices: dict[str, np.ndarray], tokenizer=None) -> dict[str, Figure]:
    """Per MoE layer of a language model: expert x frequent-token heatmap (validation windows, top-1 expert).
    Load over training is drawn as the run goes (routing_figures)."""
    out: dict[str, Figure] = {}
    for prefix, arrays in _groups(matrices).items():
        counts = arrays.get("counts_token_EV")
        if counts is None:
            continue
        ids = arrays.get("token_ids", np.arange(counts.shape[1]))
        fig = expert_class_heatmap(counts, f"val: expert x most frequent tokens ({prefix.rstrip('/')})", "token")
        ax = fig.axes[0]
        ax.set_xticks(range(len(ids)))
        ax.set_xticklabels([_token_label(tokenizer, i) for i in ids], rotation=90, fontsize=7)
        for text in list(ax.texts):  # counts per cell are unreadable at this width
            text.remove()
        out[f"figures/{prefix}expert_token.png"] = fig
    return out

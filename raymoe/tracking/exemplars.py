"""What has each expert learned? For every expert, the evaluation images it weighs highest (docs/observatory.md).

Sample-level gates weigh an image directly; a token-level layer weighs an image by its mean gate probability over
the image's tokens. Shape legend: B images, T tokens per image, E experts, N routed items.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@torch.no_grad()
def top_images(model: torch.nn.Module, batches, per_expert: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per gate (layer): (indices_EN, weights_EN) of the `per_expert` evaluation images with the highest weight
    for each expert (indices into the evaluation order)."""
    model.eval()
    weights: list[list[torch.Tensor]] = []
    for x_BZSS, _ in batches:
        out = model(x_BZSS)
        b = x_BZSS.shape[0]
        for i, gate in enumerate(out.gates):
            w_BE = gate.probs_NE.detach().float().view(b, -1, gate.probs_NE.shape[-1]).mean(1).cpu()
            if len(weights) <= i:
                weights.append([])
            weights[i].append(w_BE)
    found = []
    for per_layer in weights:
        w_BE = torch.cat(per_layer)
        top = w_BE.topk(min(per_expert, w_BE.shape[0]), dim=0)
        found.append((top.indices.T.numpy(), top.values.T.numpy()))
    return found


def exemplar_figure(images_BCHW: torch.Tensor, indices_EN: np.ndarray, weights_EN: np.ndarray,
                    mean: tuple[float, ...], std: tuple[float, ...], labels_B: torch.Tensor | None = None,
                    class_names: list[str] | None = None, title: str = "") -> Figure:
    """One row per expert: its top images (un-normalised), each titled with its gate weight and label."""
    e, n = indices_EN.shape
    fig = Figure(figsize=(1.2 * n + 0.8, 1.25 * e + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(e, n, squeeze=False)
    mean_Z = torch.tensor(mean).view(-1, 1, 1)
    std_Z = torch.tensor(std).view(-1, 1, 1)
    for r in range(e):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = (images_BCHW[int(indices_EN[r, c])].cpu() * std_Z + mean_Z).clamp(0, 1)
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1
                      else None, vmin=0, vmax=1)
            label = ""
            if labels_B is not None:
                y = int(labels_B[int(indices_EN[r, c])])
                label = class_names[y][:10] if class_names else str(y)
            ax.set_title(f"{weights_EN[r, c]:.2f} {label}", fontsize=6)
            if c == 0:
                ax.set_ylabel(f"expert {r}", fontsize=7)
    fig.suptitle(title or "each expert's highest-weighted evaluation images (gate weight, label)", fontsize=8)
    return fig

"""Pictures people would rather look at than metric tables, logged as run artifacts.

Reconstruction grids (original / masked / reconstruction / reconstruction with the visible
patches pasted back) per site every few rounds, loss curves read back from a run's metric
history, per-site bars, and each site's quality report. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot, no global backend), so this is safe in
worker threads and headless processes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from torch import Tensor


def patch_mask_to_pixels(mask: Tensor, patch: int, grid: int) -> Tensor:
    """``[N, L]`` bool patch mask (True = masked) -> ``[N, 1, grid*p, grid*p]`` bool pixel mask."""
    m = mask.reshape(mask.shape[0], 1, grid, grid)
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def masked_images(images: Tensor, mask: Tensor, patch: int, fill: float | None = None) -> Tensor:
    """The encoder's view: masked patches replaced by ``fill`` (default: each image's mean)."""
    grid = images.shape[-1] // patch
    pix = patch_mask_to_pixels(mask, patch, grid).expand_as(images)
    value = images.mean(dim=(1, 2, 3), keepdim=True).expand_as(images) if fill is None \
        else torch.full_like(images, fill)
    return torch.where(pix, value, images)


@torch.no_grad()
def reconstruction_panels(model, images: Tensor, mask: Tensor | None = None,
                          generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Original, masked, reconstruction, reconstruction+visible: each ``[N, C, H, W]``.

    ``model`` is a :class:`ultrafed.models.MaskedAutoencoderViT`; ``mask`` defaults to its
    uniform masking drawn from ``generator``.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(images, mask=mask, generator=generator)
    finally:
        model.train(was_training)
    recon = model.reconstruct(out.pred, images)
    p, g = model.encoder.patch_size, model.encoder.grid
    pix = patch_mask_to_pixels(out.mask, p, g).expand_as(images)
    return {"original": images, "masked": masked_images(images, out.mask, p),
            "reconstruction": recon, "recon + visible": torch.where(pix, recon, images)}


def _gray(ax, img: Tensor, vmin: float, vmax: float) -> None:
    ax.imshow(img[0].float().cpu().numpy(), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_figure(panels: Mapping[str, Tensor], title: str = "") -> Figure:
    """Rows = images, columns = panels; one gray scale per row (from the original)."""
    names = list(panels)
    n = panels[names[0]].shape[0]
    fig = Figure(figsize=(2.0 * len(names), 2.0 * n + (0.4 if title else 0)), dpi=100)
    axes = fig.subplots(n, len(names), squeeze=False)
    for i in range(n):
        orig = panels[names[0]][i]
        vmin, vmax = float(orig.min()), float(orig.max())
        for j, name in enumerate(names):
            _gray(axes[i][j], panels[name][i].clamp(vmin, vmax), vmin, vmax)
            if i == 0:
                axes[i][j].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def log_reconstructions(run_id: str, model, images: Tensor, *, site: str, round_idx: int,
                        generator: torch.Generator | None = None) -> str:
    """Log one site's reconstruction grid for a round; returns the artifact path."""
    fig = reconstruction_figure(reconstruction_panels(model, images, generator=generator),
                                title=f"{site} - round {round_idx}")
    path = f"pictures/reconstructions/round-{round_idx:03d}/{site}.png"
    MlflowClient().log_figure(run_id, fig, path)
    return path


def save_reconstructions(path: str | Path, model, images: Tensor, *, site: str, round_idx: int,
                         generator: torch.Generator | None = None) -> Path:
    """The same grid as :func:`log_reconstructions`, written to a file at the site (federation mode)."""
    fig = reconstruction_figure(reconstruction_panels(model, images, generator=generator),
                                title=f"{site} - round {round_idx}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def curves_figure(series: Mapping[str, Sequence[tuple[int, float]]], title: str = "loss",
                  xlabel: str = "round", ylabel: str = "loss") -> Figure:
    """One line per series of (step, value) points."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for name, points in sorted(series.items()):
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def metric_series(run_id: str, contains: str = "loss") -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run whose key contains ``contains``, as (step, value) histories."""
    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if contains in k]
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def log_loss_curves(run_id: str, *, contains: str = "loss", artifact_file: str = "pictures/loss_curves.png") -> str:
    """Plot the run's own loss metrics (per site and global, by round) and log the picture."""
    MlflowClient().log_figure(run_id, curves_figure(metric_series(run_id, contains)), artifact_file)
    return artifact_file


def bars_figure(values: Mapping[str, float], title: str, ylabel: str) -> Figure:
    """One bar per site, value printed on top (fairness across sites at a glance)."""
    fig = Figure(figsize=(max(4, 0.8 * len(values) + 2), 3.5), dpi=100)
    ax = fig.subplots()
    names = list(values)
    vals = [float(values[k]) for k in names]
    bars = ax.bar(names, vals, color="#4c72b0")
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_site_bars(run_id: str, values: Mapping[str, float], *, metric: str, round_idx: int) -> str:
    """Per-site bars of one metric for one round."""
    path = f"pictures/sites/{metric.replace('/', '_')}-round-{round_idx:03d}.png"
    MlflowClient().log_figure(run_id, bars_figure(values, f"{metric} by site, round {round_idx}", metric), path)
    return path


def log_quality_report(run_id: str, site: str, report: Mapping | str | Path) -> str:
    """A site's quality report (dict -> JSON, or an existing file such as a GX data doc)."""
    client = MlflowClient()
    if isinstance(report, Mapping):
        path = f"quality/{site}.json"
        client.log_dict(run_id, json.loads(json.dumps(report, default=str)), path)
        return path
    p = Path(report)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: quality report not found")
    client.log_artifact(run_id, str(p), f"quality/{site}")
    return f"quality/{site}/{p.name}"


def figure_to_array(fig: Figure) -> np.ndarray:
    """RGBA pixels of a figure (for tests and thumbnails)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()

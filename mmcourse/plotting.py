"""Small matplotlib helpers shared by the chapters: consistent, laptop-sized figures."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def setup_notebook(*, dpi: int = 80) -> None:
    """Readable defaults; modest dpi keeps stored notebooks small."""
    plt.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "figure.figsize": (7, 3.5),
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "xtick.labelsize": 8,
            "ytick.labelsize": 8,
            "figure.constrained_layout.use": True,
        }
    )


def _to_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # (C, H, W) -> (H, W, C)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image


def image_grid(
    images: Sequence,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    size: float = 1.4,
    cmap: str = "gray_r",
    suptitle: str | None = None,
) -> plt.Figure:
    """Show images (H, W), (H, W, C) or (C, H, W), arrays or tensors, in a grid with titles."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * bool(titles))
    )
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            image = _to_hwc(images[i])
            ax.imshow(image, cmap=cmap if image.ndim == 2 else None, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    return fig

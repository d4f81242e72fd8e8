"""Every modality becomes a tensor of vectors: text tokens, image patches, audio frames.

Axis letters: B batch, C channels, H x W image, P patch size, N tokens (patches), D width.

Taught in notebooks/01_modalities_as_tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


def _check_images(images: Tensor, patch_size: int) -> None:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if images.dim() != 4:
        raise ValueError(f"expected image batch of shape (B, C, H, W), got {tuple(images.shape)}")
    _, _, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch_size={patch_size}; "
            "crop or resize the images first"
        )


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping P x P patches and flatten each patch (ViT layout).

    Args:
        images: (B, C, H, W); H and W divisible by ``patch_size``.
        patch_size: P.

    Returns:
        (B, N, P*P*C) with N = (H/P)*(W/P), patches in row-major order, each flattened as
        (row in patch, column in patch, channel) - the layout of ``einops``
        ``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'`` used by ViT implementations.
    """
    _check_images(images, patch_size)
    B, C, H, W = images.shape
    P = patch_size
    x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C)
    return x.reshape(B, (H // P) * (W // P), P * P * C)  # (B, N, P*P*C)


def unpatchify(patches: Tensor, *, patch_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, P*P*C) -> (B, C, H, W)."""
    P = patch_size
    if patches.dim() != 3 or patches.shape[1] != (height // P) * (width // P):
        raise ValueError(
            f"expected patches (B, {(height // P) * (width // P)}, P*P*C) for a {height}x{width} "
            f"image with patch_size={P}, got {tuple(patches.shape)}"
        )
    return rearrange(
        patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=height // P, w=width // P, p1=P, p2=P
    )


class LogitScale(nn.Module):
    """A learnable inverse temperature, stored as a log, clamped where used (CLIP, open_clip).

    Args:
        init: the initial temperature's inverse as a multiplier (CLIP: 1 / 0.07).
        max_scale: the clamp (CLIP: 100).

    Taught in notebooks/01_modalities_as_tensors (first used) and 06_contrastive_learning_and_clip.
    """

    def __init__(self, *, init: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        if not 0 < init <= max_scale:
            raise ValueError(f"init must be in (0, max_scale={max_scale}], got {init}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


@dataclass
class SharedSpaceConfig:
    """Sizes of the two small towers that map two modalities into one embedding space."""

    image_dim: int = 64  # flattened input size of modality A (8x8 digit image)
    audio_dim: int = 40 * 101  # flattened input size of modality B (log-mel: mels x frames)
    hidden_dim: int = 128  # width of each tower's hidden layer
    embed_dim: int = 32  # D: the shared embedding width
    dropout: float = 0.1  # dropout inside the towers


class SharedSpace(nn.Module):
    """Two MLP towers and a learnable temperature: the smallest CLIP-style model.

    ``forward(image, audio)`` returns L2-normalised ``(image_embeds, audio_embeds)``, each
    (B, D), and the current ``logit_scale``.
    """

    def __init__(self, config: SharedSpaceConfig) -> None:
        super().__init__()
        self.config = config

        def tower(in_dim: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Flatten(),
                nn.LayerNorm(in_dim),
                nn.Linear(in_dim, config.hidden_dim),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden_dim, config.embed_dim),
            )

        self.image_tower = tower(config.image_dim)
        self.audio_tower = tower(config.audio_dim)
        self.logit_scale = LogitScale(init=10.0)

    def encode_image(self, image: Tensor) -> Tensor:
        """(B, ...) with ``image_dim`` values per item -> (B, D), unit length."""
        return nn.functional.normalize(self.image_tower(image), dim=-1)

    def encode_audio(self, audio: Tensor) -> Tensor:
        """(B, ...) with ``audio_dim`` values per item -> (B, D), unit length."""
        return nn.functional.normalize(self.audio_tower(audio), dim=-1)

    def forward(self, image: Tensor, audio: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if image.shape[0] != audio.shape[0]:
            raise ValueError(
                f"expected the same batch size for both modalities, got {image.shape[0]} images "
                f"and {audio.shape[0]} audio clips"
            )
        return self.encode_image(image), self.encode_audio(audio), self.logit_scale()


@torch.no_grad()
def retrieval_accuracy(
    query: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Tensor
) -> float:
    """Fraction of queries whose most similar key has the same label (cross-modal top-1).

    Args:
        query: (B, D) unit vectors; keys: (M, D) unit vectors; labels (B,) and (M,).
    """
    nearest = (query @ keys.T).argmax(dim=1)  # (B,)
    return (key_labels[nearest] == query_labels).float().mean().item()

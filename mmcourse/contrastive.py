"""Contrastive alignment of two modalities: the CLIP loss (symmetric InfoNCE).

Given B matching pairs, the embeddings are L2-normalised, every image is compared with every
text, and each row (and each column) of the B x B similarity matrix is a B-way
classification whose correct answer is the diagonal:

    logits = s * (u / |u|) (v / |v|)^T,   L = (CE(logits, I) + CE(logits^T, I)) / 2

where ``s = logit_scale`` is the (already exponentiated) inverse temperature.

Axis letters: B batch, D embedding width.

Taught in notebooks/01_modalities_as_tensors (a first shared space); chapter 06 goes deeper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric cross-entropy with identity targets over L2-normalised embeddings.

    Args:
        image_embeds: (B, D) embeddings of one modality (need not be normalised).
        text_embeds: (B, D) embeddings of the other; row i matches ``image_embeds`` row i.
        logit_scale: the multiplier s = 1 / temperature (already exponentiated, as in
            open_clip), a float or a 0-d tensor.

    Returns:
        The scalar loss.
    """
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "expected two (B, D) embedding batches of the same shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * image_embeds @ text_embeds.T  # (B, B): image i vs text j
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class LogitScale(nn.Module):
    """A learnable inverse temperature, stored as a log, clamped where used (CLIP, open_clip).

    Args:
        init: the initial temperature's inverse as a multiplier (CLIP: 1 / 0.07).
        max_scale: the clamp (CLIP: 100).
    """

    def __init__(self, *, init: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        if not 0 < init <= max_scale:
            raise ValueError(f"init must be in (0, max_scale={max_scale}], got {init}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

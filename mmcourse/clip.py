"""A tiny CLIP: two towers, two projections, one shared space, trained with a contrastive loss.

CLIP (Radford et al. 2021) encodes an image with an image tower and a caption with a text
tower, projects both into one D-dimensional space and trains the pair so that matching
(image, caption) pairs are the most similar in the batch (``mmcourse.contrastive``). This
module holds the model and its training loop, sized to train on the Shapes world on a CPU
in seconds:

1. ``WordTokenizer``: a word-level vocabulary built from training captions, with BERT's
   special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]). A word never seen in training becomes
   [UNK] - exactly what limits a from-scratch text tower on new wording (chapter 06).
2. ``TinyClipConfig`` / ``TinyClip``: a ViT image tower (``mmcourse.encoders.ViTEncoder``)
   and either a small BERT text tower trained from scratch (``TextEncoder``) or, for LiT,
   precomputed features of a frozen pretrained text tower (``text_tower="frozen"``),
   each followed by a linear projection to the shared space.
3. ``train_clip``: AdamW on the towers and the loss's own parameters (the learned logit
   scale, and SigLIP's bias), with bf16 autocast on CUDA.
4. ``encode_images`` / ``encode_texts``: batched, no-grad embedding for evaluation.
5. ``FeatureClipConfig`` / ``FeatureClip``: MLP heads on cached features (pixel PCA, a bag of
   words or frozen text features), a CLIP that trains in a second for chapter 06's sweeps.
6. ``zero_shot_scores`` (mean or max prompt ensembling), ``multi_positive_clip_loss`` and
   ``duplicate_loss_floor``: what repeated captions do to the loss (false negatives).

Axis letters: B batch, N tokens, D tower width, E shared embedding width, F frozen text
feature width (F_i, F_t: cached image / text features), V vocabulary, H hidden width, C
classes, T prompts per class.

Taught in notebooks/06_contrastive_learning_and_clip; reused by 07 and 15.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmcourse.encoders import TextEncoder, TextEncoderConfig, ViTConfig, ViTEncoder
from mmcourse.modalities import LogitScale
from mmcourse.pretrained import mean_pooling
from mmcourse.utils import non_negative_int, one_of, positive_float, positive_int

logger = logging.getLogger(__name__)

# --- 1. a word-level tokenizer ------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as in BERT's order
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Lower-cased words and punctuation marks, one id each; unknown words map to [UNK].

    ``tokenizer(texts)`` returns ``{"input_ids", "attention_mask"}`` of shape (B, N) like a
    Hugging Face tokenizer: ``[CLS] w_1 ... w_k [SEP]`` then [PAD] up to the longest text
    (or ``max_length``, truncating).

    Args:
        vocab: the words, in id order after the special tokens.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        if len(set(words)) != len(words):
            raise ValueError("vocab must not repeat a word")
        self.id_to_token = [*SPECIAL_TOKENS, *words]
        self.token_to_id = {token: i for i, token in enumerate(self.id_to_token)}
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id = 0, 1, 2, 3
        self.mask_token_id = 4

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, min_count: int = 1) -> WordTokenizer:
        """Build the vocabulary of ``texts``: every word seen at least ``min_count`` times."""
        positive_int(min_count=min_count)
        counts: dict[str, int] = {}
        for text in texts:
            for word in cls.split(text):
                counts[word] = counts.get(word, 0) + 1
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case ``text`` and cut it into words and punctuation marks."""
        if not isinstance(text, str):
            raise ValueError(f"expected a string, got {type(text).__name__}")
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.id_to_token)

    @property
    def vocab_size(self) -> int:
        """V, the number of ids, special tokens included."""
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        """``[CLS] w_1 ... w_k [SEP]`` as ids, without padding."""
        ids = [self.token_to_id.get(w, self.unk_token_id) for w in self.split(text)]
        return [self.cls_token_id, *ids, self.sep_token_id]

    def __call__(self, texts: Sequence[str], *, max_length: int | None = None) -> dict[str, Tensor]:
        """Tokenize a batch: ``input_ids`` and ``attention_mask``, both (B, N) int64."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("expected at least one text, got an empty list")
        encoded = [self.encode(text) for text in texts]
        if max_length is not None:
            positive_int(max_length=max_length)
            if max_length < 2:
                raise ValueError(
                    f"max_length must leave room for [CLS] and [SEP], got {max_length}"
                )
            encoded = [
                e if len(e) <= max_length else [*e[: max_length - 1], e[-1]] for e in encoded
            ]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
        return {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_token_id).long()}

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids back to words, joined by spaces."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        tokens = [self.id_to_token[i] for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in ("[PAD]", "[CLS]", "[SEP]")]
        return " ".join(tokens)

    def unknown_fraction(self, texts: Sequence[str]) -> float:
        """The fraction of words of ``texts`` that are not in the vocabulary."""
        words = [w for text in texts for w in self.split(text)]
        return sum(w not in self.token_to_id for w in words) / max(1, len(words))


# --- 2. the model ---------------------------------------------------------------------------


@dataclass
class TinyClipConfig:
    """Sizes of a tiny CLIP; the defaults train on the 32 x 32 Shapes world on a CPU.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    embed_dim: int = 64  # E: width of the shared embedding space
    image_size: int = 32  # S: side of the square input image
    patch_size: int = 8  # P: patch side of the image tower
    vision_dim: int = 64  # D_v: width of the image tower
    vision_layers: int = 2  # blocks of the image tower
    vision_heads: int = 4  # attention heads of the image tower
    text_tower: str = (
        "scratch"  # "scratch": a small BERT trained here; "frozen": precomputed features (LiT)
    )
    vocab_size: int = 0  # V of the from-scratch text tower (the tokenizer's); unused when frozen
    max_text_length: int = 32  # longest caption in tokens, [CLS] and [SEP] included
    text_dim: int = 64  # D_t: width of the from-scratch text tower
    text_layers: int = 2  # blocks of the from-scratch text tower
    text_heads: int = 4  # attention heads of the from-scratch text tower
    text_feature_dim: int = 384  # F: width of the frozen tower's features (MiniLM: 384)
    dropout: float = 0.0  # dropout inside both towers

    def __post_init__(self) -> None:
        positive_int(embed_dim=self.embed_dim, max_text_length=self.max_text_length)
        one_of("text_tower", self.text_tower, ("scratch", "frozen"))
        if self.text_tower == "scratch" and self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                "text_tower='scratch' needs vocab_size, the tokenizer's (e.g. "
                f"len(WordTokenizer)), got vocab_size={self.vocab_size}"
            )
        if self.text_tower == "frozen":
            positive_int(text_feature_dim=self.text_feature_dim)

    def vision_config(self) -> ViTConfig:
        """The image tower's :class:`ViTConfig` (pre-norm, 2-D sin-cos, [CLS] pooled)."""
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            dim=self.vision_dim,
            num_layers=self.vision_layers,
            num_heads=self.vision_heads,
            dropout=self.dropout,
        )

    def text_config(self) -> TextEncoderConfig:
        """The from-scratch text tower's :class:`TextEncoderConfig` (no pooler)."""
        return TextEncoderConfig(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_text_length,
            type_vocab_size=1,
            dim=self.text_dim,
            num_layers=self.text_layers,
            num_heads=self.text_heads,
            hidden_dim=4 * self.text_dim,
            dropout=self.dropout,
            attention_dropout=self.dropout,
            add_pooling_layer=False,
        )


def _check_text(text: dict[str, Tensor] | Tensor, *, feature_dim: int | None) -> None:
    """Captions must be (B, feature_dim) frozen features, or, when ``feature_dim`` is None,
    the tokenizer's dict with ``input_ids`` (and ``attention_mask``)."""
    if feature_dim is not None:
        if not isinstance(text, Tensor) or text.dim() != 2 or text.shape[1] != feature_dim:
            shape = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(
                f"expected precomputed text features of shape (B, {feature_dim}) "
                f"(text_feature_dim={feature_dim}), got {shape}"
            )
    elif not isinstance(text, dict) or "input_ids" not in text:
        raise ValueError(
            "a text tower trained here takes the tokenizer's dict with input_ids and "
            f"attention_mask, got {type(text).__name__}"
        )


class TinyClip(nn.Module):
    """Image tower + text tower, each with a bias-free linear projection to the shared space.

    ``encode_image`` and ``encode_text`` return *unnormalised* (B, E) embeddings, as
    ``transformers``' ``CLIPModel.get_image_features``; the losses normalise them.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    def __init__(self, config: TinyClipConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ViTEncoder(config.vision_config())
        self.image_projection = nn.Linear(config.vision_dim, config.embed_dim, bias=False)
        if config.text_tower == "scratch":
            self.text_encoder: TextEncoder | None = TextEncoder(config.text_config())
            text_width = config.text_dim
        else:  # LiT: the text tower is frozen and lives outside; only its projection trains
            self.text_encoder = None
            text_width = config.text_feature_dim
        self.text_projection = nn.Linear(text_width, config.embed_dim, bias=False)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) images in [0, 1] -> (B, E): the [CLS] token, projected."""
        return self.image_projection(self.image_encoder(images).pooled)

    def encode_text(self, text: dict[str, Tensor] | Tensor) -> Tensor:
        """Captions -> (B, E).

        Args:
            text: for the from-scratch tower, the tokenizer's dict with ``input_ids`` and
                ``attention_mask`` (B, N); for ``text_tower="frozen"``, the frozen tower's
                (B, F) features.

        Returns:
            (B, E): the mean of the caption's token vectors (padding excluded), projected.
        """
        frozen = self.text_encoder is None
        _check_text(text, feature_dim=self.config.text_feature_dim if frozen else None)
        if frozen:
            return self.text_projection(text)
        mask = text.get("attention_mask")
        out = self.text_encoder(text["input_ids"], mask)  # last_hidden_state (B, N, D_t)
        if mask is None:
            mask = torch.ones_like(text["input_ids"])
        return self.text_projection(mean_pooling(out.last_hidden_state, mask))

    def forward(self, images: Tensor, text: dict[str, Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(image_embeds, text_embeds)``, both (B, E), unnormalised."""
        return self.encode_image(images), self.encode_text(text)


# --- 3. training -------------------------------------------------------------------------


def _index_text(text: dict[str, Tensor] | Tensor, index: Tensor) -> dict[str, Tensor] | Tensor:
    """Rows ``index`` of a tokenizer dict or a feature tensor, trimmed of all-padding columns."""
    if isinstance(text, Tensor):
        return text[index]
    rows = {key: value[index] for key, value in text.items()}
    if "attention_mask" in rows:
        width = max(1, int(rows["attention_mask"].sum(1).max()))
        rows = {key: value[:, :width] for key, value in rows.items()}
    return rows


def _to(text: dict[str, Tensor] | Tensor, device: torch.device) -> dict[str, Tensor] | Tensor:
    if isinstance(text, Tensor):
        return text.to(device)
    return {key: value.to(device) for key, value in text.items()}


def _num_rows(text: dict[str, Tensor] | Tensor) -> int:
    return len(text) if isinstance(text, Tensor) else len(text["input_ids"])


@dataclass
class ClipTrainConfig:
    """How ``train_clip`` trains; the defaults suit the tiny CLIP on Shapes.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    steps: int = 800  # optimiser steps
    batch_size: int = 128  # B: pairs per step, i.e. B - 1 negatives for every pair
    lr: float = 3e-3  # AdamW peak learning rate (linear warm-up, then cosine to 0)
    warmup_steps: int = 20  # steps of linear warm-up
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on the logit scale or bias)
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0  # batch order
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        positive_int(steps=self.steps, batch_size=self.batch_size)
        non_negative_int(warmup_steps=self.warmup_steps, seed=self.seed)
        positive_float(lr=self.lr, grad_clip=self.grad_clip)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ClipHistory:
    """What ``train_clip`` records at every step."""

    loss: list[float] = field(default_factory=list)  # the training loss
    logit_scale: list[float] = field(default_factory=list)  # s = 1 / tau, if the loss has one
    seconds: float = 0.0  # wall time of the loop
    pairs_per_second: float = 0.0  # training throughput


def adamw_warmup_cosine(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up, then a cosine decay to 0: CLIP's recipe.

    Weight decay applies to matrices only, not to biases, norm scales or a logit scale
    (1-D and 0-D parameters); parameters with ``requires_grad=False`` are left out.
    Chapter 08 (``mmcourse.train``) builds the general version of this.

    Args:
        params: the parameters to train, e.g. the towers' and the loss's.
        lr: the peak learning rate.
        weight_decay: AdamW's decoupled weight decay on the matrices.
        warmup_steps: steps of linear warm-up, lr * (step + 1) / warmup_steps.
        total_steps: the step at which the cosine reaches 0.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_clip(
    model: TinyClip | FeatureClip,
    loss_fn: nn.Module,
    images: Tensor,
    text: dict[str, Tensor] | Tensor,
    *,
    config: ClipTrainConfig | None = None,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
) -> ClipHistory:
    """Train ``model`` (and ``loss_fn``'s parameters, e.g. the logit scale) on pairs.

    Each step draws B pairs without replacement (a fresh permutation per epoch) and
    minimises ``loss_fn(image_embeds, text_embeds)``, e.g. ``ClipLoss()`` or ``SigLipLoss()``.
    AdamW with warm-up and cosine decay; on CUDA the towers run under bf16 autocast while the
    loss is computed in float32.

    Args:
        model: the :class:`TinyClip` (or :class:`FeatureClip`) to train, moved to ``device``.
        loss_fn: a module mapping (B, E), (B, E) to a scalar; its parameters train too.
        images: (N, 3, S, S) float images (for a :class:`FeatureClip`, (N, F_i) features).
        text: the N captions, as the tokenizer's dict of (N, L) tensors or (N, F) features.
        config: :class:`ClipTrainConfig`; the defaults if None.
        device: where to train; the model's current device if None.
        labels: optional (N,) ids passed to the loss as a third argument,
            ``loss_fn(image_embeds, text_embeds, labels[batch])``, e.g. for
            :class:`MultiPositiveClipLoss` (equal ids = interchangeable captions).

    Returns:
        :class:`ClipHistory`. The model is left in eval mode.
    """
    config = ClipTrainConfig() if config is None else config
    n = len(images)
    if _num_rows(text) != n:
        raise ValueError(f"need one caption per image, got {n} images and {_num_rows(text)} texts")
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {n} training pairs")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"expected labels of shape ({n},), got {tuple(labels.shape)}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.to(device).train()
    loss_fn.to(device).train()
    optimizer, scheduler = adamw_warmup_cosine(
        [*model.parameters(), *loss_fn.parameters()],
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
    )
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = ClipHistory()
    start = time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in tqdm(range(config.steps), desc="CLIP", disable=not config.progress, leave=False):
        if cursor + config.batch_size > n:  # next epoch
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        batch_images = images[index].to(device, non_blocking=True)
        batch_text = _to(_index_text(text, index), device)
        with autocast:
            image_embeds, text_embeds = model(batch_images, batch_text)
        if labels is None:
            loss = loss_fn(image_embeds.float(), text_embeds.float())
        else:
            loss = loss_fn(image_embeds.float(), text_embeds.float(), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        history.loss.append(loss.item())
        scale = getattr(loss_fn, "logit_scale", None)
        if scale is not None:
            history.logit_scale.append(float(scale().detach() if callable(scale) else scale))
    history.seconds = time.perf_counter() - start
    history.pairs_per_second = config.steps * config.batch_size / history.seconds
    model.eval()
    loss_fn.eval()
    logger.info(
        "trained CLIP for %d steps in %.1f s, final loss %.3f",
        config.steps,
        history.seconds,
        history.loss[-1],
    )
    return history


# --- 4. embedding for evaluation ---------------------------------------------------------


@torch.no_grad()
def encode_images(
    model: TinyClip | FeatureClip, images: Tensor, *, batch_size: int = 512
) -> Tensor:
    """(N, 3, S, S) images -> (N, E) unit-norm embeddings on the CPU, in batches."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model.encode_image(images[i : i + batch_size].to(device))
        for i in range(0, len(images), batch_size)
    ]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


@torch.no_grad()
def encode_texts(
    model: TinyClip | FeatureClip, text: dict[str, Tensor] | Tensor, *, batch_size: int = 512
) -> Tensor:
    """Captions (the tokenizer's dict, or (N, F) frozen features) -> (N, E) unit-norm embeddings."""
    model.eval()
    device = next(model.parameters()).device
    n = _num_rows(text)
    out = []
    for i in range(0, n, batch_size):
        index = torch.arange(i, min(n, i + batch_size))
        out.append(model.encode_text(_to(_index_text(text, index), device)))
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


# --- 5. a CLIP on cached features, for cheap experiments ---------------------------------


@dataclass
class FeatureClipConfig:
    """Sizes of :class:`FeatureClip`: small heads on precomputed features.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    image_feature_dim: int  # F_i: width of the precomputed image features (e.g. pixel PCA)
    vocab_size: int = 0  # V > 0: a bag-of-words text encoder over WordTokenizer ids
    text_feature_dim: int = 0  # F_t > 0 instead: precomputed (frozen) text features, e.g. MiniLM
    hidden_dim: int = 256  # H: hidden width of both heads
    embed_dim: int = 64  # E: width of the shared embedding space

    def __post_init__(self) -> None:
        positive_int(
            image_feature_dim=self.image_feature_dim,
            hidden_dim=self.hidden_dim,
            embed_dim=self.embed_dim,
        )
        non_negative_int(vocab_size=self.vocab_size, text_feature_dim=self.text_feature_dim)
        if (self.vocab_size > 0) == (self.text_feature_dim > 0):
            raise ValueError(
                "set exactly one of vocab_size (bag-of-words text) and text_feature_dim "
                f"(frozen text features), got vocab_size={self.vocab_size} and "
                f"text_feature_dim={self.text_feature_dim}"
            )


class FeatureClip(nn.Module):
    """Two MLP heads over cached features: a CLIP that trains in about a second on a CPU.

    The image head maps (B, F_i) features to (B, E); the text head is either a bag of words
    (the mean of learned word vectors over the caption's tokens, then an MLP) or an MLP on
    (B, F_t) frozen features. It has the same ``encode_image`` / ``encode_text`` / ``forward``
    as :class:`TinyClip`, so :func:`train_clip`, :func:`encode_images` and
    :func:`encode_texts` take it too (with features in place of images).

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    def __init__(self, config: FeatureClipConfig) -> None:
        super().__init__()
        self.config = config
        H, E = config.hidden_dim, config.embed_dim
        self.image_head = nn.Sequential(
            nn.Linear(config.image_feature_dim, H), nn.GELU(), nn.Linear(H, E)
        )
        if config.vocab_size > 0:
            self.word_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, H)
            self.text_head = nn.Sequential(nn.GELU(), nn.Linear(H, E))
        else:
            self.word_embeddings = None
            self.text_head = nn.Sequential(
                nn.Linear(config.text_feature_dim, H), nn.GELU(), nn.Linear(H, E)
            )

    def encode_image(self, features: Tensor) -> Tensor:
        """(B, F_i) image features -> (B, E)."""
        if features.dim() != 2 or features.shape[1] != self.config.image_feature_dim:
            raise ValueError(
                f"expected image features of shape (B, {self.config.image_feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        return self.image_head(features)

    def encode_text(self, text: dict[str, Tensor] | Tensor) -> Tensor:
        """The tokenizer's dict (bag of words) or (B, F_t) frozen features -> (B, E)."""
        frozen = self.word_embeddings is None
        _check_text(text, feature_dim=self.config.text_feature_dim if frozen else None)
        if frozen:
            return self.text_head(text)
        ids = text["input_ids"]  # (B, N)
        mask = text.get("attention_mask", torch.ones_like(ids))  # (B, N)
        bag = mean_pooling(self.word_embeddings(ids), mask)  # (B, H): mean word vector
        return self.text_head(bag)

    def forward(self, features: Tensor, text: dict[str, Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(image_embeds, text_embeds)``, both (B, E), unnormalised."""
        return self.encode_image(features), self.encode_text(text)


# --- 6. zero-shot scores, repeated captions ------------------------------------------------


def zero_shot_scores(
    image_embeds: Tensor, prompt_embeds: Tensor, *, ensemble: str = "mean"
) -> Tensor:
    """Cosine scores of N images against C classes, each described by T prompts.

    * ``ensemble="mean"``: CLIP's prompt ensembling (Radford et al. 2021, §3.1.4): average
      the T unit-norm prompt embeddings of a class, re-normalise, take the cosine. The same
      scores as ``mmcourse.contrastive.zero_shot_classifier``.
    * ``ensemble="max"``: a class scores as its best-matching prompt. Better when the
      prompts of one class describe visibly different images (a *small* circle *on the
      left*, a *large* one *at the top*), whose mean embedding resembles none of them.

    Args:
        image_embeds: (N, E) image embeddings (need not be normalised).
        prompt_embeds: (C, T, E) text embeddings of T prompts for each of C classes.
        ensemble: ``"mean"`` or ``"max"``.

    Returns:
        (N, C) scores; ``argmax(-1)`` is the zero-shot prediction.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    one_of("ensemble", ensemble, ("mean", "max"))
    if image_embeds.dim() != 2 or prompt_embeds.dim() != 3:
        raise ValueError(
            "expected image_embeds (N, E) and prompt_embeds (C, T, E), got "
            f"{tuple(image_embeds.shape)} and {tuple(prompt_embeds.shape)}"
        )
    if image_embeds.shape[1] != prompt_embeds.shape[2]:
        raise ValueError(
            f"image_embeds has width {image_embeds.shape[1]} but prompt_embeds has width "
            f"{prompt_embeds.shape[2]}"
        )
    image_embeds = F.normalize(image_embeds, dim=-1)  # (N, E)
    prompt_embeds = F.normalize(prompt_embeds, dim=-1)  # (C, T, E)
    if ensemble == "mean":
        classes = F.normalize(prompt_embeds.mean(dim=1), dim=-1)  # (C, E)
        return image_embeds @ classes.T  # (N, C)
    return torch.einsum("ne,cte->nct", image_embeds, prompt_embeds).amax(dim=-1)  # (N, C)


def multi_positive_clip_loss(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float, labels: Tensor
) -> Tensor:
    """The CLIP loss with every pair of equal ``labels`` counted as a positive.

    The identity targets of ``clip_loss`` say that caption j is wrong for image i even when
    caption j == caption i (a *false negative*). Here the target of row i is spread evenly
    over the columns with ``labels[j] == labels[i]`` (the soft target of SupCon-style,
    label-aware contrastive losses), in both directions:

        q_ij = [y_i = y_j] / sum_k [y_i = y_k],   L = -(1/2B) sum_ij q_ij (log p_ij + log p'_ij)

    with p = softmax over the rows of ``s u v^T`` and p' over its columns. With all labels
    distinct it equals ``clip_loss``.

    Args:
        image_embeds: (B, D) image embeddings (need not be normalised).
        text_embeds: (B, D) text embeddings; row i matches ``image_embeds`` row i.
        logit_scale: s = 1 / tau, already exponentiated.
        labels: (B,) integer ids; equal ids mark interchangeable captions (e.g. the same text).

    Returns:
        The scalar loss.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "expected two (B, D) embedding batches of the same shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if labels.shape != (image_embeds.shape[0],):
        raise ValueError(
            f"expected labels of shape ({image_embeds.shape[0]},), got {tuple(labels.shape)}"
        )
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale * image_embeds @ text_embeds.T  # (B, B)
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1)  # (B,)
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1)  # (B,)
    return (image_to_text.mean() + text_to_image.mean()) / 2


class MultiPositiveClipLoss(nn.Module):
    """:func:`multi_positive_clip_loss` with CLIP's learned, clamped logit scale.

    Called as ``loss_fn(image_embeds, text_embeds, labels)``; ``train_clip(..., labels=...)``
    passes each batch's labels.

    Args:
        init_scale: initial s = 1 / tau (CLIP: 1 / 0.07), stored as ln(s).
        max_scale: clamp on s (CLIP: 100).

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    def __init__(self, *, init_scale: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.logit_scale = LogitScale(init=init_scale, max_scale=max_scale)

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, labels: Tensor) -> Tensor:
        """Args: (B, D), (B, D) embeddings and (B,) labels. Returns: the scalar loss."""
        return multi_positive_clip_loss(image_embeds, text_embeds, self.logit_scale(), labels)


def duplicate_loss_floor(labels: Tensor) -> float:
    """The lowest ``clip_loss`` a batch can reach when some captions repeat.

    Identical captions have identical embeddings, so in row i the k_i columns with caption
    i's text get equal logits and the diagonal gets at most 1/k_i of the probability: the
    loss of that row is at least log k_i, in both directions. The floor is mean_i log k_i
    (0 when every caption is distinct), whatever the model and the temperature. It is also
    the floor of :func:`multi_positive_clip_loss` with these labels (the entropy of its
    targets), which with exact copies has the same value and gradient as ``clip_loss``.

    Args:
        labels: (B,) ids, equal for equal captions.

    Returns:
        mean_i log k_i, in nats.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"expected a non-empty (B,) tensor of labels, got {tuple(labels.shape)}")
    counts = (labels[:, None] == labels[None, :]).sum(dim=1)  # (B,) k_i
    return counts.double().log().mean().item()

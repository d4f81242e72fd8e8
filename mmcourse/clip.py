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
3. ``PairBatches`` and ``clip_recipe``: the shuffled pairs and CLIP's optimiser settings for
   ``mmcourse.train.fit``, the course's one training loop, with
   ``mmcourse.contrastive.PairObjective`` as its loss; the model owns its learned logit
   scale (and SigLIP's bias), so AdamW trains it with the towers. ``train_pairs`` is that
   ``fit`` call by name.
4. ``encode_images`` / ``encode_texts``: batched, no-grad embedding for evaluation.
5. ``FeatureClipConfig`` / ``FeatureClip``: MLP heads on cached features (pixel PCA, a bag of
   words or frozen text features), a CLIP that trains in a second for chapter 06's sweeps.
6. ``zero_shot_scores`` (mean or max prompt ensembling) and ``duplicate_loss_floor``: what
   repeated captions do to the loss (false negatives; the remedy,
   ``multi_positive_clip_loss``, lives with the other losses in ``mmcourse.contrastive``).

Axis letters: B batch, N tokens, D tower width, E shared embedding width, F frozen text
feature width (F_i, F_t: cached image / text features), V vocabulary, H hidden width, C
classes, T prompts per class.

Taught in notebooks/06_contrastive_learning_and_clip; reused by 07 and 15.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.contrastive import PairObjective
from mmcourse.encoders import TextEncoder, TextEncoderConfig, ViTConfig, ViTEncoder
from mmcourse.modalities import LogitScale
from mmcourse.pretrained import mean_pooling
from mmcourse.train import FitResult, ShuffledBatches, TrainConfig, fit
from mmcourse.utils import non_negative_int, one_of, positive_int

logger = logging.getLogger(__name__)

# --- 1. a word-level tokenizer ------------------------------------------------------------

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on s = 1 / tau
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
    logit_scale_init: float = 1 / 0.07  # s = 1 / tau at the start (CLIP: 1 / 0.07; SigLIP: 10)
    logit_bias_init: float | None = None  # SigLIP's learned bias b (paper: -10); None: no bias

    def __post_init__(self) -> None:
        positive_int(embed_dim=self.embed_dim, max_text_length=self.max_text_length)
        _check_temperature(self.logit_scale_init, self.logit_bias_init)
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


def _check_temperature(scale_init: float, bias_init: float | None) -> None:
    if not 0 < scale_init <= MAX_LOGIT_SCALE:
        raise ValueError(f"logit_scale_init must be in (0, {MAX_LOGIT_SCALE}], got {scale_init!r}")
    if bias_init is not None and not math.isfinite(bias_init):
        raise ValueError(f"logit_bias_init must be a finite number or None, got {bias_init!r}")


def _add_temperature(model: nn.Module, scale_init: float, bias_init: float | None) -> None:
    """The model's own learned logit scale s (as ln s, clamped at 100) and optional bias b."""
    model.logit_scale = LogitScale(init=scale_init, max_scale=MAX_LOGIT_SCALE)
    bias = None if bias_init is None else nn.Parameter(torch.tensor(float(bias_init)))
    model.register_parameter("logit_bias", bias)


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
    ``transformers``' ``CLIPModel.get_image_features``; the losses normalise them. The model
    owns its learned temperature, ``logit_scale()`` = s = 1 / tau (and ``logit_bias`` b for
    SigLIP, else None), as ``CLIPModel`` and open_clip do.

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
        _add_temperature(self, config.logit_scale_init, config.logit_bias_init)

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
    return _trim({key: value[index] for key, value in text.items()})


def _trim(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """Cut a batch of the tokenizer's (B, N) tensors to its longest caption."""
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


class PairBatches:
    """Shuffled batches of (image, caption) pairs for :func:`mmcourse.train.fit`.

    The rows come from :class:`mmcourse.train.ShuffledBatches` (the course's one epoch
    sampler: a fresh seeded permutation per epoch, the last partial batch dropped, made when
    iterated); token captions are cut to the longest one in the batch. Pass the batches
    with ``loss_fn=mmcourse.contrastive.PairObjective()``.

    Args:
        images: (N, 3, S, S) images, or (N, F_i) features for a :class:`FeatureClip`.
        text: the N captions: the tokenizer's dict of (N, L) tensors, or (N, F) features.
        labels: optional (N,) ids, equal for interchangeable captions; each batch then
            carries them third, for the multi-positive loss.
        batch_size: B, pairs per step (B - 1 negatives for every pair).
        num_batches: batches in one pass (``fit`` cycles them); ``None``: one epoch.
        seed: seed of the permutations.

    Yields:
        ``(images, text)`` or ``(images, text, labels)``, B rows each.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """

    def __init__(
        self,
        images: Tensor,
        text: dict[str, Tensor] | Tensor,
        *,
        labels: Tensor | None = None,
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        n = len(images)
        if _num_rows(text) != n:
            raise ValueError(
                f"need one caption per image, got {n} images and {_num_rows(text)} texts"
            )
        if labels is not None and labels.shape != (n,):
            raise ValueError(f"expected labels of shape ({n},), got {tuple(labels.shape)}")
        self.names = None if isinstance(text, Tensor) else list(text)
        columns = [text] if isinstance(text, Tensor) else list(text.values())
        extra = [] if labels is None else [labels]
        self.rows = ShuffledBatches(
            images, *columns, *extra, batch_size=batch_size, num_batches=num_batches, seed=seed
        )
        self.has_labels = labels is not None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple]:
        for images, *columns in self.rows:
            labels = [columns.pop()] if self.has_labels else []
            if self.names is None:
                text: dict[str, Tensor] | Tensor = columns[0]
            else:
                text = _trim(dict(zip(self.names, columns, strict=True)))
            yield (images, text, *labels)


def clip_recipe(max_steps: int = 800, **overrides: Any) -> TrainConfig:
    """CLIP's optimisation as a :class:`~mmcourse.train.TrainConfig` for ``fit``.

    AdamW at a peak lr of 3e-3, decoupled weight decay 0.05 on the matrices only (not on
    biases, norms or the logit scale), 20 steps of linear warm-up (at most ``max_steps``),
    then a cosine to 0;
    gradients clipped at norm 1; no evaluation during training, no progress bar. Any
    other :class:`~mmcourse.train.TrainConfig` field can be overridden, e.g.
    ``clip_recipe(300, lr=1e-2, device="cuda")``; the batch order's seed belongs to
    :class:`PairBatches`.

    Taught in notebooks/06_contrastive_learning_and_clip.
    """
    settings: dict[str, Any] = {
        "lr": 3e-3,
        "weight_decay": 0.05,
        "warmup_steps": min(20, max_steps),
        "eval_every": max_steps,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(max_steps=max_steps, **settings)


def train_pairs(
    model: nn.Module,
    images: Tensor,
    text: dict[str, Tensor] | Tensor,
    *,
    steps: int,
    batch_size: int,
    labels: Tensor | None = None,
    loss: Callable[..., Tensor] | None = None,
    seed: int = 0,
    **recipe: Any,
) -> FitResult:
    """One ``fit`` call that trains a two-tower model on (image, caption) pairs.

    Exactly ``fit(model, PairBatches(images, text, labels=labels, batch_size=batch_size,
    seed=seed), loss_fn=PairObjective(loss), config=clip_recipe(steps, **recipe),
    log_fn=record_logit_scale)``: the loop is :func:`mmcourse.train.fit`; this only names
    the call the chapters repeat. Each history row holds the step's ``loss`` and
    ``logit_scale``.

    Taught in notebooks/06_contrastive_learning_and_clip; reused by 07, 12-14.
    """
    batches = PairBatches(images, text, labels=labels, batch_size=batch_size, seed=seed)
    return fit(
        model,
        batches,
        loss_fn=PairObjective(loss),
        config=clip_recipe(steps, **recipe),
        log_fn=record_logit_scale,
    )


def record_logit_scale(model: nn.Module) -> dict[str, float]:
    """``fit``'s ``log_fn`` that records s = 1 / tau (and SigLIP's b) at every step."""
    owner = getattr(model, "module", model)
    row = {"logit_scale": float(owner.logit_scale().detach())}
    if getattr(owner, "logit_bias", None) is not None:
        row["logit_bias"] = float(owner.logit_bias.detach())
    return row


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
    logit_scale_init: float = 1 / 0.07  # s = 1 / tau at the start (CLIP: 1 / 0.07; SigLIP: 10)
    logit_bias_init: float | None = None  # SigLIP's learned bias b (paper: -10); None: no bias

    def __post_init__(self) -> None:
        _check_temperature(self.logit_scale_init, self.logit_bias_init)
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
    and learned temperature as :class:`TinyClip`, so :class:`PairBatches`,
    :func:`encode_images` and :func:`encode_texts` take it too (features in place of images).

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
        _add_temperature(self, config.logit_scale_init, config.logit_bias_init)

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

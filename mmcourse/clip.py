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

Axis letters: B batch, N tokens, D tower width, E shared embedding width, F frozen text
feature width, V vocabulary.

Taught in notebooks/06_contrastive_learning_and_clip; reused by 07 and 15.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmcourse.encoders import TextEncoder, TextEncoderConfig, ViTConfig, ViTEncoder
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
        if self.text_encoder is None:
            if not isinstance(text, Tensor) or text.dim() != 2:
                raise ValueError(
                    "text_tower='frozen' takes precomputed (B, F) text features, got "
                    f"{tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__}"
                )
            if text.shape[1] != self.config.text_feature_dim:
                raise ValueError(
                    f"expected text features of width text_feature_dim="
                    f"{self.config.text_feature_dim}, got {text.shape[1]}"
                )
            return self.text_projection(text)
        if not isinstance(text, dict) or "input_ids" not in text:
            raise ValueError(
                "the from-scratch text tower takes the tokenizer's dict with input_ids and "
                f"attention_mask, got {type(text).__name__}"
            )
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


def train_clip(
    model: TinyClip,
    loss_fn: nn.Module,
    images: Tensor,
    text: dict[str, Tensor] | Tensor,
    *,
    config: ClipTrainConfig | None = None,
    device: torch.device | str | None = None,
) -> ClipHistory:
    """Train ``model`` (and ``loss_fn``'s parameters, e.g. the logit scale) on pairs.

    Each step draws B pairs without replacement (a fresh permutation per epoch) and
    minimises ``loss_fn(image_embeds, text_embeds)``, e.g. ``ClipLoss()`` or ``SigLipLoss()``.
    AdamW with warm-up and cosine decay; on CUDA the towers run under bf16 autocast while the
    loss is computed in float32.

    Args:
        model: the :class:`TinyClip` to train (moved to ``device``).
        loss_fn: a module mapping (B, E), (B, E) to a scalar; its parameters train too.
        images: (N, 3, S, S) float images.
        text: the N captions, as the tokenizer's dict of (N, L) tensors or (N, F) features.
        config: :class:`ClipTrainConfig`; the defaults if None.
        device: where to train; the model's current device if None.

    Returns:
        :class:`ClipHistory`. The model is left in eval mode.
    """
    config = ClipTrainConfig() if config is None else config
    n = len(images)
    if _num_rows(text) != n:
        raise ValueError(f"need one caption per image, got {n} images and {_num_rows(text)} texts")
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {n} training pairs")
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.to(device).train()
    loss_fn.to(device).train()
    decay, no_decay = [], []
    for module in (model, loss_fn):
        for param in module.parameters():
            if param.requires_grad:
                (decay if param.dim() >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )

    def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
        loss = loss_fn(image_embeds.float(), text_embeds.float())
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
def encode_images(model: TinyClip, images: Tensor, *, batch_size: int = 512) -> Tensor:
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
    model: TinyClip, text: dict[str, Tensor] | Tensor, *, batch_size: int = 512
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

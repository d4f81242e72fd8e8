"""Pretraining objectives beyond contrast: masked language modelling and image-text matching.

Chapter 06 trained two towers with the image-text contrastive loss (ITC): the towers never
see each other, they only meet in one dot product. ALBEF (Li et al. 2021) and BLIP (Li et
al. 2022) add a *fusion encoder* in which the caption's tokens cross-attend to the image's
patch tokens, and train it with two more objectives:

1. **Masked language modelling** (MLM, BERT): hide 15 % of the caption's tokens and predict
   them. ``mask_tokens`` applies BERT's 80/10/10 rule; ``MlmHead`` is BERT's prediction head
   (transform + decoder tied to the word embeddings); ``mlm_loss`` averages the
   cross-entropy over the masked positions only. With cross-attention to the image, the
   model can fill "a [MASK] circle" by looking at the picture.
2. **Image-text matching** (ITM): a 2-way classifier on the fused [CLS] token says whether
   the caption describes the image. Its negatives are *hard*: for each image a caption that
   the contrastive model finds similar but that is not a match (``sample_negatives``).

``ImageTextEncoder`` holds the fusion encoder and both heads; ``pretrain`` trains it on
precomputed image tokens (a frozen image tower, as the notebook does to stay fast) through
``mmcourse.train.fit``, with ``PretrainBatches`` drawing the masks and negatives and
``pretrain_loss`` the loss of one batch; the
evaluation helpers and ``linear_probe_accuracy`` compare what the objectives taught.

Axis letters: B batch, N text tokens ([CLS] included), M image tokens, D fusion width,
K image-token width, V vocabulary, E contrastive embedding width.

Taught in notebooks/07_pretraining_objectives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.attention import MultiHeadAttention
from mmcourse.encoders import (
    ACTIVATIONS,
    FeedForward,
    TextEncoder,
    TextEncoderConfig,
    TransformerBlock,
    ViTConfig,
    ViTEncoder,
    init_weights,
    load_from_torch_layer,
)
from mmcourse.train import ShuffledBatches, TrainConfig, fit
from mmcourse.utils import fraction, non_negative_int, one_of, positive_float, positive_int

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a position that is not predicted (PyTorch's and HF's default)

# --- 1. BERT's masking ------------------------------------------------------------------------


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: choose positions to predict, corrupt them with the 80/10/10 rule.

    1. every non-special position is chosen with probability ``probability`` (15 %);
       special tokens ([CLS], [SEP], [PAD], ...) never are;
    2. a chosen position becomes [MASK] with probability ``mask_replace_prob`` (80 %), a
       uniformly random id with ``random_replace_prob`` (10 %), and stays unchanged otherwise;
    3. ``labels`` holds the original id at chosen positions and -100 elsewhere, so that the
       loss is computed on the chosen positions only.

    The random draws are made in the same order as ``transformers``'
    ``DataCollatorForLanguageModeling.torch_mask_tokens``: with generators seeded alike, both
    give the same tensors (the tests check it).

    Args:
        input_ids: (B, N) integer token ids (not modified).
        mask_token_id: the id of [MASK].
        vocab_size: V; random replacements are drawn from [0, V), as BERT does.
        special_ids: ids that are never chosen (at least the padding id).
        probability: the chance that a position is chosen.
        mask_replace_prob: the chance that a chosen position becomes [MASK].
        random_replace_prob: the chance that a chosen position becomes a random id.
        generator: a ``torch.Generator`` for reproducible masks; None uses the global RNG.

    Returns:
        ``(masked_ids, labels)``, both (B, N) int64.

    Taught in notebooks/07_pretraining_objectives.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ValueError(f"expected input_ids of shape (B, N) with integer dtype, got {shape}")
    positive_int(vocab_size=vocab_size)
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id must be in [0, vocab_size={vocab_size}), got {mask_token_id}"
        )
    fraction(
        probability=probability,
        mask_replace_prob=mask_replace_prob,
        random_replace_prob=random_replace_prob,
    )
    if mask_replace_prob + random_replace_prob > 1:
        raise ValueError(
            "mask_replace_prob + random_replace_prob must be <= 1, got "
            f"{mask_replace_prob} + {random_replace_prob}"
        )
    if isinstance(special_ids, (int, Tensor)) or len(special_ids) == 0:
        raise ValueError(
            f"special_ids must be a non-empty sequence of ids (at least [PAD]), got {special_ids!r}"
        )
    if mask_token_id not in special_ids:
        raise ValueError(f"special_ids must include mask_token_id={mask_token_id}")
    ids = input_ids.long()
    labels = ids.clone()
    special = torch.isin(ids, torch.as_tensor(list(special_ids), device=ids.device))  # (B, N)
    # 1) choose positions: Bernoulli(p) on non-special tokens
    chance = torch.full(ids.shape, float(probability)).masked_fill_(special.cpu(), 0.0)
    chosen = torch.bernoulli(chance, generator=generator).bool().to(ids.device)  # (B, N)
    labels[~chosen] = IGNORE_INDEX
    masked = ids.clone()
    # 2a) 80 %: [MASK]
    to_mask = torch.bernoulli(torch.full(ids.shape, float(mask_replace_prob)), generator=generator)
    to_mask = to_mask.bool().to(ids.device) & chosen
    masked[to_mask] = mask_token_id
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return masked, labels
    # 2b) 10 % of all chosen = random_replace_prob / (1 - mask_replace_prob) of the rest
    scaled = random_replace_prob / (1 - mask_replace_prob)
    to_random = torch.bernoulli(torch.full(ids.shape, scaled), generator=generator)
    to_random = to_random.bool().to(ids.device) & chosen & ~to_mask
    random_ids = torch.randint(vocab_size, ids.shape, dtype=torch.long, generator=generator)
    masked[to_random] = random_ids.to(ids.device)[to_random]
    # 2c) the remaining 10 %: unchanged (but still predicted: labels keep them)
    return masked, labels


def mask_positions(
    input_ids: Tensor, positions: Tensor, *, mask_token_id: int
) -> tuple[Tensor, Tensor]:
    """Mask chosen positions deterministically (for evaluation): [MASK] there, labels there.

    Args:
        input_ids: (B, N) token ids.
        positions: (B,) the position to mask in each row, or a (B, N) bool mask.
        mask_token_id: the id of [MASK].

    Returns:
        ``(masked_ids, labels)``, (B, N) each; labels are -100 except at the masked positions.

    Taught in notebooks/07_pretraining_objectives.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"expected input_ids of shape (B, N), got {tuple(input_ids.shape)}")
    if positions.dim() == 1:
        if positions.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"expected one position per row, (B,) = ({input_ids.shape[0]},), got "
                f"{tuple(positions.shape)}"
            )
        if positions.min() < 0 or positions.max() >= input_ids.shape[1]:
            raise ValueError(f"positions must be in [0, N={input_ids.shape[1]})")
        where = F.one_hot(positions.long(), input_ids.shape[1]).bool()  # (B, N)
    elif positions.shape == input_ids.shape and positions.dtype == torch.bool:
        where = positions
    else:
        raise ValueError(
            "positions must be (B,) indices or a (B, N) bool mask like input_ids "
            f"{tuple(input_ids.shape)}, got {tuple(positions.shape)} {positions.dtype}"
        )
    labels = input_ids.long().masked_fill(~where, IGNORE_INDEX)
    return input_ids.long().masked_fill(where, mask_token_id), labels


# --- 2. the MLM head and loss -----------------------------------------------------------------


class MlmHead(nn.Module):
    """BERT's MLM head: transform (Linear, GELU, LayerNorm), then a decoder tied to the inputs.

    ``logits = LayerNorm(GELU(h W_t + b_t)) E^T + b``: E is the (V, D) word-embedding table,
    shared with the input layer (weight tying), b a per-word output bias. Same parameters as
    ``transformers``' ``BertOnlyMLMHead`` (``predictions.transform.dense``,
    ``predictions.transform.LayerNorm``, ``predictions.decoder``, ``predictions.bias``).

    Args:
        dim: D, the width of the hidden states.
        vocab_size: V.
        word_embeddings: the input ``nn.Embedding`` (V, D) to tie the decoder to; None gives
            the decoder its own weight.
        activation: the transform's non-linearity (BERT: exact GELU).
        layer_norm_eps: the transform's LayerNorm epsilon (BERT: 1e-12).

    Taught in notebooks/07_pretraining_objectives.
    """

    def __init__(
        self,
        *,
        dim: int,
        vocab_size: int,
        word_embeddings: nn.Embedding | None = None,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        positive_int(dim=dim, vocab_size=vocab_size)
        one_of("activation", activation, ACTIVATIONS)
        self.dense = nn.Linear(dim, dim)  # W_t, b_t
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.decoder = nn.Linear(dim, vocab_size)  # E^T and b
        if word_embeddings is not None:
            if tuple(word_embeddings.weight.shape) != (vocab_size, dim):
                raise ValueError(
                    f"word_embeddings must be ({vocab_size}, {dim}) = (vocab_size, dim) to be "
                    f"tied, got {tuple(word_embeddings.weight.shape)}"
                )
            self.decoder.weight = word_embeddings.weight  # weight tying: one (V, D) table
        nn.init.zeros_(self.decoder.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(B, N, D) hidden states -> (B, N, V) logits over the vocabulary."""
        h = self.norm(self.activation(self.dense(hidden_states)))  # (B, N, D)
        return self.decoder(h)  # (B, N, V)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the masked positions (labels != -100) only.

    ``L_MLM = -1/|M| sum_{i in M} log p(w_i | corrupted caption [, image])``, M the masked set.
    Averaging over *all* positions instead would train the model to copy the visible tokens
    and dilute the signal of the few that matter.

    Args:
        logits: (B, N, V) scores.
        labels: (B, N) original ids at masked positions, -100 elsewhere.

    Returns:
        The scalar loss.

    Raises:
        ValueError: mismatched shapes, or no masked position at all (the mean would be NaN).

    Taught in notebooks/07_pretraining_objectives.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, N, V) and labels (B, N), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not (labels != IGNORE_INDEX).any():
        raise ValueError("no masked position: every label is -100, so the MLM loss is undefined")
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


# --- 3. the fusion encoder: text tokens cross-attend to image tokens --------------------------


class CrossAttentionBlock(nn.Module):
    """A BERT layer with cross-attention (ALBEF's fusion layer), post-norm::

        x = norm1(x + SelfAttn(x))
        x = norm2(x + CrossAttn(query=x, key=value=image tokens))
        x = norm3(x + FFN(x))

    Names follow ``nn.TransformerDecoderLayer`` (``self_attn``, ``multihead_attn``, ``norm1``
    ..``norm3``; the FFN's ``linear1``/``linear2`` sit in ``ffn``) and
    :func:`load_from_torch_decoder_layer` copies such a layer in; unlike a decoder, the self-
    attention is bidirectional (no causal mask).

    Args:
        dim: D, the text token width.
        num_heads: H, for both attentions.
        image_dim: K, the width of the image tokens (keys and values of the cross-attention);
            None means D.
        hidden_dim: F, the FFN width; None means 4 D.
        dropout: dropout on the residual branches and the attention weights.
        activation: the FFN non-linearity.
        layer_norm_eps: the three LayerNorms' epsilon (BERT: 1e-12).

    Taught in notebooks/07_pretraining_objectives.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        image_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        positive_int(dim=dim, num_heads=num_heads)
        fraction(dropout=dropout)
        image_dim = dim if image_dim is None else image_dim
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.self_attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.multihead_attn = MultiHeadAttention(
            dim=dim, num_heads=num_heads, dropout=dropout, kdim=image_dim, vdim=image_dim
        )
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ffn = FeedForward(dim=dim, hidden_dim=hidden_dim, activation=activation)
        self.norm3 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        image_tokens: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Apply the block.

        Args:
            x: (B, N, D) text tokens.
            image_tokens: (B, M, K) image tokens.
            key_padding_mask: (B, N) bool, True at text padding (not attended to).
            need_weights: also return the cross-attention weights.

        Returns:
            ``(x, weights)``: (B, N, D) and the (B, H, N, M) cross-attention weights or None.
        """
        a, _ = self.self_attn(x, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.norm1(x + self.dropout(a))  # (B, N, D)
        c, weights = self.multihead_attn(x, image_tokens, image_tokens, need_weights=need_weights)
        x = self.norm2(x + self.dropout(c))  # (B, N, D): every text token has looked at the image
        x = self.norm3(x + self.dropout(self.ffn(x)))  # (B, N, D)
        return x, weights


@torch.no_grad()
def load_from_torch_decoder_layer(
    block: CrossAttentionBlock, layer: nn.TransformerDecoderLayer
) -> None:
    """Copy an ``nn.TransformerDecoderLayer`` (post-norm, ``batch_first=True``) into a block.

    ``self_attn`` and ``multihead_attn`` map through ``MultiHeadAttention.from_torch``;
    ``linear1``/``linear2`` to ``ffn``; ``norm1..3`` to ``norm1..3``.

    Raises:
        ValueError: naming the first setting that differs (width, heads, norm order, epsilon,
            activation).

    Taught in notebooks/07_pretraining_objectives.
    """
    load_from_torch_layer(block, layer)


@dataclass
class ImageTextConfig:
    """Sizes of a tiny ALBEF-style fusion encoder for the Shapes world.

    Taught in notebooks/07_pretraining_objectives.
    """

    vocab_size: int = 0  # V: the tokenizer's vocabulary (len(WordTokenizer)), required
    max_text_length: int = 32  # longest caption in tokens, [CLS] and [SEP] included
    image_dim: int = 64  # K: width of the image tokens (the image tower's width)
    dim: int = 64  # D: width of the text and fusion layers
    text_layers: int = 1  # text-only BERT layers before fusion (ALBEF: 6)
    fusion_layers: int = 1  # layers with cross-attention to the image (ALBEF: 6)
    num_heads: int = 4  # H: attention heads
    dropout: float = 0.0  # dropout everywhere (ALBEF: 0.1)
    use_image: bool = True  # False: the fusion layers skip cross-attention (a text-only BERT)
    vision: ViTConfig | None = None  # an image tower of its own (trained too); None: takes tokens

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 6:
            raise ValueError(
                f"vocab_size must be the tokenizer's (e.g. len(WordTokenizer)), got {self.vocab_size!r}"
            )
        positive_int(max_text_length=self.max_text_length, image_dim=self.image_dim)
        positive_int(dim=self.dim, text_layers=self.text_layers, num_heads=self.num_heads)
        non_negative_int(fusion_layers=self.fusion_layers)
        fraction(dropout=self.dropout)
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide dim={self.dim}")
        if not isinstance(self.use_image, bool):
            raise ValueError(f"use_image must be True or False, got {self.use_image!r}")
        if self.vision is not None and self.vision.dim != self.image_dim:
            raise ValueError(
                f"image_dim={self.image_dim} must equal the image tower's width vision.dim="
                f"{self.vision.dim}"
            )
        if self.vision is not None and not self.use_image:
            raise ValueError("a text-only model (use_image=False) has no image tower: vision=None")


class ImageTextEncoder(nn.Module):
    """Text layers, then fusion layers (text cross-attends to image), with ITM and MLM heads.

    ``fused(...)`` gives the (B, N, D) multimodal token states; ``itm_logits`` applies a
    2-way head to the fused [CLS] (index 1 = "match"); ``mlm_logits`` applies
    :class:`MlmHead` (tied to the word embeddings) to every token. With
    ``use_image=False`` the fusion layers are plain BERT layers and the model never sees
    the image - the text-only baseline with the same depth.

    Taught in notebooks/07_pretraining_objectives.
    """

    def __init__(self, config: ImageTextConfig) -> None:
        super().__init__()
        c = self.config = config
        self.image_encoder = ViTEncoder(c.vision) if c.vision is not None else None
        self.text_encoder = TextEncoder(
            TextEncoderConfig(
                vocab_size=c.vocab_size,
                max_position_embeddings=c.max_text_length,
                type_vocab_size=1,
                dim=c.dim,
                num_layers=c.text_layers,
                num_heads=c.num_heads,
                hidden_dim=4 * c.dim,
                dropout=c.dropout,
                attention_dropout=c.dropout,
                add_pooling_layer=False,
            )
        )
        if c.use_image:
            self.fusion = nn.ModuleList(
                CrossAttentionBlock(
                    dim=c.dim, num_heads=c.num_heads, image_dim=c.image_dim, dropout=c.dropout
                )
                for _ in range(c.fusion_layers)
            )
        else:  # the same depth without the image: plain (post-norm) BERT layers
            self.fusion = nn.ModuleList(
                TransformerBlock(
                    dim=c.dim,
                    num_heads=c.num_heads,
                    hidden_dim=4 * c.dim,
                    dropout=c.dropout,
                    activation_dropout=0.0,
                    norm_first=False,
                    layer_norm_eps=1e-12,
                )
                for _ in range(c.fusion_layers)
            )
        self.itm_head = nn.Linear(c.dim, 2)
        self.mlm_head = MlmHead(
            dim=c.dim,
            vocab_size=c.vocab_size,
            word_embeddings=self.text_encoder.embeddings.word_embeddings,
        )
        for module in (self.fusion, self.itm_head, self.mlm_head.dense, self.mlm_head.norm):
            module.apply(init_weights)

    def image_tokens(self, images: Tensor) -> Tensor:
        """The image tokens the text attends to: (B, M, K) as given, or the tower's output.

        With ``config.vision`` set, ``images`` are (B, 3, S, S) pixels and the model's own
        ViT encodes them ([CLS] and patch tokens, ``last_hidden_state``); otherwise
        ``images`` already are precomputed tokens and are returned unchanged.
        """
        if self.image_encoder is None:
            return images
        return self.image_encoder(images).last_hidden_state  # (B, M, K)

    def _check(self, image_tokens: Tensor | None, input_ids: Tensor) -> None:
        c = self.config
        if not c.use_image:
            return
        if image_tokens is None:
            raise ValueError("this model has use_image=True: pass the images (or image tokens)")
        if image_tokens.dim() != 3 or image_tokens.shape[2] != c.image_dim:
            raise ValueError(
                f"expected image_tokens of shape (B, M, K={c.image_dim}), got "
                f"{tuple(image_tokens.shape)}"
            )
        if image_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"need one image per caption, got {image_tokens.shape[0]} images and "
                f"{input_ids.shape[0]} captions"
            )

    def fused(
        self,
        image_tokens: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        output_attentions: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Encode captions that look at their images.

        Args:
            image_tokens: (B, M, K) image tokens (e.g. a frozen ViT's ``last_hidden_state``),
                or (B, 3, S, S) images when the model has its own tower (``config.vision``);
                None only with ``use_image=False``.
            input_ids: (B, N) token ids.
            attention_mask: (B, N), 1 for real tokens, 0 for padding.
            output_attentions: also return each fusion layer's (B, H, N, M) cross-attention.

        Returns:
            ``(states, cross_attentions)``: (B, N, D) and a tuple or None.
        """
        if image_tokens is not None and self.config.use_image:
            image_tokens = self.image_tokens(image_tokens)  # (B, M, K)
        self._check(image_tokens, input_ids)
        x = self.text_encoder(input_ids, attention_mask).last_hidden_state  # (B, N, D)
        pad = None if attention_mask is None else attention_mask == 0  # (B, N), True = padding
        maps = []
        for block in self.fusion:
            if self.config.use_image:
                x, w = block(x, image_tokens, key_padding_mask=pad, need_weights=output_attentions)
                maps.append(w)
            else:
                x, _ = block(x, key_padding_mask=pad)
        return x, (tuple(maps) if output_attentions else None)

    def itm_logits(
        self, image_tokens: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B, 2) ITM logits from the fused [CLS]: column 1 = "the caption matches"."""
        return self.itm_head(self.fused(image_tokens, input_ids, attention_mask)[0][:, 0])

    def mlm_logits(
        self, image_tokens: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B, N, V) MLM logits for every position of the (masked) captions."""
        return self.mlm_head(self.fused(image_tokens, input_ids, attention_mask)[0])


# --- 4. hard negatives from a contrastive similarity matrix ------------------------------------


def sample_negatives(
    similarity: Tensor,
    *,
    ids: Tensor | None = None,
    hard: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one negative text per image and one negative image per text (ALBEF, BLIP).

    ``similarity[i, j]`` scores image i against text j (the ITC logits s_ij = u_i . v_j / tau);
    pair (i, i) is the positive. With ``hard=True`` image i gets text j with probability

        p(j | i) = exp(s_ij) / sum_{k not positive for i} exp(s_ik),   j not positive for i,

    (ALBEF's ``softmax(sim_i2t)`` with the positive zeroed), so the texts the contrastive
    model finds most similar - the ones hardest to tell apart - are drawn most often;
    likewise each text gets an image from column j. ``temperature`` T > 1 tempers the draw,
    ``softmax(s_ij / T)``: with a sharp, converged ITC the same near-duplicate would otherwise
    be drawn every epoch. With ``hard=False`` the draw is uniform over the same candidates
    (random negatives; T is then ignored).

    *False negatives*: a candidate that is as true as the positive (an identical caption, a
    second caption of the same image) must not be drawn, or the model is taught that a
    correct pair does not match - and hard mining would prefer exactly those. Pass ``ids``
    (B,): pairs with the same id (e.g. the same caption string, or BLIP's image id) are
    positives of each other and are never drawn.

    Args:
        similarity: (B, B) scores, image rows, text columns.
        ids: (B,) group ids; None: only the diagonal is positive.
        hard: sample in proportion to softmax(similarity / temperature) (True) or uniformly.
        temperature: T > 0 divides the similarity before the softmax (1: ALBEF's draw).
        generator: for reproducible draws.

    Returns:
        ``(text_for_image, image_for_text)``: (B,) long indices; text ``text_for_image[i]``
        is a negative for image i, image ``image_for_text[j]`` one for text j.

    Raises:
        ValueError: a non-square matrix, ids of the wrong shape, or a row whose every
            candidate is a positive (e.g. a batch of identical captions).

    Taught in notebooks/07_pretraining_objectives.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            f"expected a square (B, B) similarity matrix, got {tuple(similarity.shape)}"
        )
    B = similarity.shape[0]
    if B < 2:
        raise ValueError(f"need a batch of at least 2 pairs to find negatives, got B={B}")
    positive_float(temperature=temperature)
    positive = torch.eye(B, dtype=torch.bool, device=similarity.device)  # (B, B)
    if ids is not None:
        if ids.shape != (B,):
            raise ValueError(f"expected ids of shape ({B},), one per pair, got {tuple(ids.shape)}")
        ids = ids.to(similarity.device)
        positive = positive | (ids[:, None] == ids[None, :])
    if positive.all(dim=1).any():
        i = int(positive.all(dim=1).nonzero()[0])
        raise ValueError(
            f"pair {i} has no negative candidate: every text in the batch is a positive for it "
            "(identical captions?); use a larger or more varied batch"
        )
    s = similarity.detach().float() / temperature
    if hard:
        weights_i2t = s.masked_fill(positive, -math.inf).softmax(dim=1)  # (B, B), rows sum to 1
        weights_t2i = s.T.masked_fill(positive.T, -math.inf).softmax(dim=1)  # text rows
    else:
        weights_i2t = (~positive).float()
        weights_t2i = (~positive.T).float()
    text_for_image = torch.multinomial(weights_i2t.cpu(), 1, generator=generator).squeeze(1)
    image_for_text = torch.multinomial(weights_t2i.cpu(), 1, generator=generator).squeeze(1)
    return text_for_image.to(similarity.device), image_for_text.to(similarity.device)


def sample_bank_negatives(
    similarity: Tensor,
    own: Tensor,
    *,
    hard: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """Draw one negative text per image from a caption *bank* instead of the batch.

    When the world has few distinct captions (here 200), each image can be scored against
    all of them: image i gets bank caption j != ``own[i]`` with probability
    ``softmax(similarity[i] / T)`` over the other captions (or uniformly if ``hard=False``).
    The training negatives then come from the same pool as the test-time shortlist (ITC's
    top-k over every caption), not from whichever 31 captions share the batch. A bank of
    distinct captions has no false negatives besides the image's own caption.

    Args:
        similarity: (B, C) ITC logits of B images against the C bank captions.
        own: (B,) the bank index of each image's true caption (never drawn).
        hard: sample from the tempered softmax (True) or uniformly (False).
        temperature: T > 0 divides the similarity before the softmax.
        generator: for reproducible draws.
        allowed: optional (B, C) bool: the only bank captions image i may get (e.g. the
            captions that change exactly one attribute of its own, :func:`attribute_neighbours`);
            every row needs at least one allowed caption besides ``own[i]``.

    Returns:
        (B,) long bank indices, on the similarity's device.

    Taught in notebooks/07_pretraining_objectives.
    """
    if similarity.dim() != 2 or similarity.shape[1] < 2:
        raise ValueError(
            f"expected a (B, C) similarity with C >= 2 bank captions, got {tuple(similarity.shape)}"
        )
    B, C = similarity.shape
    if own.shape != (B,):
        raise ValueError(
            f"expected own of shape ({B},), one bank index per image, got {tuple(own.shape)}"
        )
    own = own.long().to(similarity.device)
    if own.min() < 0 or own.max() >= C:
        raise ValueError(f"own must index the bank: values in [0, C={C})")
    weights = bank_negative_weights(
        similarity, own, hard=hard, temperature=temperature, allowed=allowed
    )
    drawn = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1)
    return drawn.to(similarity.device)


def bank_negative_weights(
    similarity: Tensor,
    own: Tensor,
    *,
    hard: bool = True,
    temperature: float = 1.0,
    allowed: Tensor | None = None,
) -> Tensor:
    """The (B, C) weights ``sample_bank_negatives`` draws from: softmax(similarity / T) with
    each image's own caption at 0 (``hard``), or 1 for every other caption (uniform, unnormalised).
    With ``allowed`` (B, C) bool, captions outside it get weight 0 too.

    Taught in notebooks/07_pretraining_objectives (its explorer).
    """
    positive_float(temperature=temperature)
    own = own.long().to(similarity.device)
    positive = F.one_hot(own, similarity.shape[1]).bool()  # (B, C)
    if allowed is not None:
        if allowed.shape != similarity.shape or allowed.dtype != torch.bool:
            raise ValueError(
                f"allowed must be a bool mask like similarity {tuple(similarity.shape)}, got "
                f"{tuple(allowed.shape)} {allowed.dtype}"
            )
        positive = positive | ~allowed.to(similarity.device)  # excluded like the positive
        if positive.all(dim=1).any():
            i = int(positive.all(dim=1).nonzero()[0])
            raise ValueError(f"image {i} has no allowed negative caption besides its own")
    if hard:
        weights = (similarity.detach().float() / temperature).masked_fill(positive, -math.inf)
        return weights.softmax(dim=1)  # (B, C)
    return (~positive).float()


def attribute_neighbours(codes: Tensor, *, distance: int = 1) -> Tensor:
    """Which captions differ from which in exactly ``distance`` attributes: a (C, C) bool mask.

    The *one-attribute* negatives of a caption ("a large red circle on the left" -> "a large
    blue circle on the left") are the captions a model can only reject by checking every
    attribute; ``attribute_neighbours(codes)[own]`` is the ``allowed`` mask of
    :func:`sample_bank_negatives` that draws only those.

    Args:
        codes: (C, A) integer codes, one row per caption, one column per attribute.
        distance: how many attributes must differ (>= 1).

    Returns:
        (C, C) bool, True where rows i and j differ in exactly ``distance`` attributes.

    Taught in notebooks/07_pretraining_objectives.
    """
    if codes.dim() != 2 or codes.is_floating_point():
        raise ValueError(
            f"expected integer codes of shape (C, A), got {tuple(codes.shape)} {codes.dtype}"
        )
    positive_int(distance=distance)
    return (codes[:, None, :] != codes[None, :, :]).sum(-1) == distance  # (C, C)


# --- 5. the ITM loss ---------------------------------------------------------------------------


def itm_loss(logits: Tensor, labels: Tensor, *, positive_weight: float = 1.0) -> Tensor:
    """Binary matching as 2-way cross-entropy: ``L_ITM = -E log p(y | image, text)``.

    ALBEF's batches hold one positive for two negatives, so an unweighted loss teaches a
    1:2 prior (a model that ignores the pair predicts p(match) = 1/3). ``positive_weight=2``
    balances the classes: the weighted mean is ``sum_m w_m l_m / sum_m w_m`` with w = 2 on
    positives (``F.cross_entropy(weight=[1, 2])``), and a pair-blind model then sits at
    ln 2 with p = 1/2.

    Args:
        logits: (M, 2) ITM logits (column 1 = match).
        labels: (M,) 1 for matching pairs, 0 for negatives.
        positive_weight: the weight of the positive class (1: plain mean).

    Returns:
        The scalar loss (the weighted mean over the M pairs).

    Taught in notebooks/07_pretraining_objectives.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"expected ITM logits of shape (M, 2), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected labels of shape ({logits.shape[0]},), got {tuple(labels.shape)}"
        )
    if labels.numel() and not ((labels == 0) | (labels == 1)).all():
        raise ValueError("ITM labels must be 0 (no match) or 1 (match)")
    positive_float(positive_weight=positive_weight)
    if positive_weight == 1.0:
        return F.cross_entropy(logits.float(), labels.long())
    weight = torch.tensor([1.0, float(positive_weight)], device=logits.device)
    return F.cross_entropy(logits.float(), labels.long(), weight=weight)


def itm_triplets(text_for_image: Tensor, image_for_text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ALBEF's ITM batch from B pairs: B positives, B (image, hard text), B (hard image, text).

    Args:
        text_for_image, image_for_text: (B,) from :func:`sample_negatives`.

    Returns:
        ``(image_index, text_index, labels)``, each (3B,): which image and which text form
        each ITM pair, and its label (1 for the first B).

    Taught in notebooks/07_pretraining_objectives.
    """
    B = text_for_image.shape[0]
    if image_for_text.shape != (B,):
        raise ValueError(
            f"expected two (B,) index tensors, got {(B,)} and {tuple(image_for_text.shape)}"
        )
    arange = torch.arange(B, device=text_for_image.device)
    image_index = torch.cat([arange, arange, image_for_text])  # (3B,)
    text_index = torch.cat([arange, text_for_image, arange])  # (3B,)
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(arange.device)
    return image_index, text_index, labels


# --- 6. pretraining on precomputed image tokens -----------------------------------------------


@dataclass
class PretrainConfig:
    """How :func:`pretrain` trains an :class:`ImageTextEncoder`.

    Taught in notebooks/07_pretraining_objectives.
    """

    objectives: tuple[str, ...] = ("mlm",)  # any of "mlm", "itm"; their losses are summed
    steps: int = 300  # optimiser steps
    batch_size: int = 64  # B: captions per step (ITM scores 3B pairs per step)
    lr: float = 2e-3  # AdamW peak learning rate (linear warm-up, then cosine to 0)
    warmup_steps: int = 20  # steps of linear warm-up
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # max global gradient norm
    mask_probability: float = 0.15  # MLM: chance that a token is chosen (BERT: 0.15)
    negatives: str = "hard"  # ITM: "hard" (softmax of the ITC similarity) or "random"
    temperature: float = 1.0  # ITM: hard negatives ~ softmax(ITC logits / T) (ALBEF: 1)
    positive_weight: float = 1.0  # ITM: loss weight of the positives (2 balances 1:2)
    seed: int = 0  # batch order, masks and negative draws
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if isinstance(self.objectives, str):
            self.objectives = (self.objectives,)
        if not self.objectives:
            raise ValueError("objectives must name at least one of 'mlm', 'itm'")
        for name in self.objectives:
            one_of("an objective", name, ("mlm", "itm"))
        positive_int(steps=self.steps, batch_size=self.batch_size)
        non_negative_int(warmup_steps=self.warmup_steps, seed=self.seed)
        positive_float(lr=self.lr, grad_clip=self.grad_clip)
        positive_float(temperature=self.temperature, positive_weight=self.positive_weight)
        fraction(mask_probability=self.mask_probability)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        one_of("negatives", self.negatives, ("hard", "random"))


@dataclass
class PretrainHistory:
    """What :func:`pretrain` records at every step."""

    loss: dict[str, list[float]] = field(default_factory=dict)  # per objective
    seconds: float = 0.0  # wall time of the loop


def _trim(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    width = max(1, int(attention_mask.sum(1).max()))
    return input_ids[:, :width], attention_mask[:, :width]


def pretrain(
    model: ImageTextEncoder,
    *,
    image_tokens: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: PretrainConfig,
    special_ids: Sequence[int] = (0, 1, 2, 3, 4),
    mask_token_id: int = 4,
    similarity_embeds: tuple[Tensor, Tensor, float] | None = None,
    caption_ids: Tensor | None = None,
    caption_bank: tuple[Tensor, Tensor, Tensor] | None = None,
    negative_pool: Tensor | None = None,
    device: torch.device | str | None = None,
) -> PretrainHistory:
    """Train ``model`` with MLM and/or ITM on precomputed (frozen) image tokens.

    Each step draws B pairs (a fresh permutation per epoch). MLM: :func:`mask_tokens` then
    :func:`mlm_loss`. ITM: the (B, B) ITC similarity of the batch from ``similarity_embeds``,
    one negative text per image and one negative image per text (:func:`sample_negatives`,
    hard or random, tempered by ``config.temperature``), the 3B pairs of
    :func:`itm_triplets` and :func:`itm_loss` (positives weighted by
    ``config.positive_weight``). With ``caption_bank`` the negative *text* of each image is
    drawn from the whole bank of distinct captions (:func:`sample_bank_negatives`), not
    from the batch; the negative image of each text still comes from the batch.

    Args:
        model: the :class:`ImageTextEncoder`.
        image_tokens: (P, M, K) tokens of the P training images (or (P, 3, S, S) images if
            the model has its own image tower); None if ``use_image=False``.
        input_ids, attention_mask: (P, N) the tokenized captions.
        config: :class:`PretrainConfig`.
        special_ids, mask_token_id: the tokenizer's (``mmcourse.clip.WordTokenizer``'s
            defaults: [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4).
        similarity_embeds: ITM only: ``(image_embeds (P, E), text_embeds (P, E), scale)``,
            unit-norm ITC embeddings and the logit scale 1 / tau.
        caption_ids: ITM only: (P,) ids, equal for identical captions (false negatives);
            with ``caption_bank`` they must be each caption's row in the bank.
        caption_bank: ITM only: ``(bank_input_ids (C, N), bank_attention_mask (C, N),
            bank_text_embeds (C, E))``: every distinct caption, tokenized and embedded by ITC.
        negative_pool: ITM with ``caption_bank`` only: (C, C) bool, row c the bank captions
            that may be drawn as the negative text of a pair whose caption is c (e.g.
            :func:`attribute_neighbours`); None: every other caption of the bank.
        device: where to train; the model's device if None.

    Returns:
        :class:`PretrainHistory`. The model is left in eval mode.

    Taught in notebooks/07_pretraining_objectives.
    """
    if "itm" in config.objectives and not model.config.use_image:
        raise ValueError("ITM needs images: a model with use_image=True and image_tokens")
    device = next(model.parameters()).device if device is None else torch.device(device)
    batches = PretrainBatches(
        image_tokens,
        input_ids,
        attention_mask,
        config=config,
        vocab_size=model.config.vocab_size,
        special_ids=special_ids,
        mask_token_id=mask_token_id,
        similarity_embeds=similarity_embeds,
        caption_ids=caption_ids,
        caption_bank=caption_bank,
        negative_pool=negative_pool,
    )
    train_config = TrainConfig(
        max_steps=config.steps,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=min(config.warmup_steps, config.steps),
        grad_clip=config.grad_clip,
        eval_every=config.steps,
        progress=config.progress,
        device=str(device),
    )
    result = fit(model, batches, loss_fn=pretrain_loss, config=train_config)
    history = PretrainHistory(
        loss={name: [r[name] for r in result.history if name in r] for name in config.objectives},
        seconds=result.seconds,
    )
    logger.info(
        "pretrained %s for %d steps in %.1f s", config.objectives, config.steps, history.seconds
    )
    return history


class PretrainBatch(NamedTuple):
    """One step of MLM and/or ITM: what :func:`pretrain_loss` needs (None: objective off).

    Taught in notebooks/07_pretraining_objectives.
    """

    images: Tensor | None  # (B, M, K) image tokens of the batch (or (B, 3, S, S) images)
    attention_mask: Tensor  # (B, N) the captions' mask, trimmed to the longest caption
    mlm_input_ids: Tensor | None  # (B, N) the captions with BERT's masking applied
    mlm_labels: Tensor | None  # (B, N) the hidden tokens, IGNORE_INDEX elsewhere
    itm_image_index: Tensor | None  # (3B,) row of ``images`` of each ITM pair
    itm_input_ids: Tensor | None  # (3B, N') the text of each ITM pair
    itm_attention_mask: Tensor | None  # (3B, N')
    itm_labels: Tensor | None  # (3B,) 1: match, 0: not
    positive_weight: float = 1.0  # ITM: loss weight of the positives


def pretrain_loss(model: ImageTextEncoder, batch: PretrainBatch) -> dict[str, Tensor]:
    """``fit``'s loss: the sum of the batch's MLM and ITM losses, each part recorded.

    Taught in notebooks/07_pretraining_objectives.
    """
    parts = {}
    if batch.mlm_labels is not None and (batch.mlm_labels != IGNORE_INDEX).any():
        logits = model.mlm_logits(batch.images, batch.mlm_input_ids, batch.attention_mask)
        parts["mlm"] = mlm_loss(logits, batch.mlm_labels)
    if batch.itm_labels is not None:
        logits = model.itm_logits(
            batch.images[batch.itm_image_index], batch.itm_input_ids, batch.itm_attention_mask
        )
        parts["itm"] = itm_loss(logits, batch.itm_labels, positive_weight=batch.positive_weight)
    if not parts:  # no token was masked in this batch (rare) and no ITM
        zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
        return {"loss": zero, "mlm": zero.detach()}
    return {"loss": sum(parts.values()), **parts}


class PretrainBatches:
    """The batches of :func:`pretrain`: shuffled pairs, BERT's masks, ITM's negatives.

    The rows come from :class:`mmcourse.train.ShuffledBatches` (seeded with
    ``config.seed``); masks and negative draws from a second generator seeded with
    ``config.seed + 1``. Both restart with every pass, so the batches are reproducible.
    The arguments are those of :func:`pretrain`, and are checked here.

    Taught in notebooks/07_pretraining_objectives.
    """

    def __init__(
        self,
        image_tokens: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        config: PretrainConfig,
        vocab_size: int,
        special_ids: Sequence[int] = (0, 1, 2, 3, 4),
        mask_token_id: int = 4,
        similarity_embeds: tuple[Tensor, Tensor, float] | None = None,
        caption_ids: Tensor | None = None,
        caption_bank: tuple[Tensor, Tensor, Tensor] | None = None,
        negative_pool: Tensor | None = None,
    ) -> None:
        P = input_ids.shape[0]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if image_tokens is not None and image_tokens.shape[0] != P:
            raise ValueError(f"need one image per caption, got {image_tokens.shape[0]} and {P}")
        if "itm" in config.objectives:
            if image_tokens is None:
                raise ValueError("ITM needs images: a model with use_image=True and image_tokens")
            if similarity_embeds is None:
                raise ValueError("ITM needs similarity_embeds=(image_embeds, text_embeds, scale)")
            if similarity_embeds[0].shape[0] != P or similarity_embeds[1].shape[0] != P:
                raise ValueError(f"similarity_embeds must have one row per pair ({P})")
            if caption_bank is not None:
                bank_ids, bank_mask, bank_embeds = caption_bank
                C = bank_ids.shape[0]
                if bank_mask.shape != bank_ids.shape or bank_embeds.shape[0] != C:
                    raise ValueError(
                        "caption_bank must be (input_ids (C, N), attention_mask (C, N), embeds (C, E))"
                    )
                if caption_ids is None or caption_ids.shape != (P,):
                    raise ValueError("caption_bank needs caption_ids (P,): each caption's bank row")
                if caption_ids.min() < 0 or caption_ids.max() >= C:
                    raise ValueError(f"caption_ids must index the bank of C={C} captions")
                if negative_pool is not None and (
                    negative_pool.shape != (C, C) or negative_pool.dtype != torch.bool
                ):
                    raise ValueError(
                        f"negative_pool must be a ({C}, {C}) bool mask over the bank, got "
                        f"{tuple(negative_pool.shape)} {negative_pool.dtype}"
                    )
            elif negative_pool is not None:
                raise ValueError(
                    "negative_pool restricts draws from caption_bank: pass caption_bank"
                )
        if config.batch_size > P:
            raise ValueError(
                f"batch_size={config.batch_size} is larger than the {P} training pairs"
            )
        self.image_tokens = image_tokens
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.config, self.vocab_size = config, vocab_size
        self.special_ids, self.mask_token_id = special_ids, mask_token_id
        self.similarity_embeds, self.caption_ids = similarity_embeds, caption_ids
        self.caption_bank, self.negative_pool = caption_bank, negative_pool
        self.rows = ShuffledBatches(
            torch.arange(len(input_ids)),
            batch_size=config.batch_size,
            num_batches=config.steps,
            seed=config.seed,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PretrainBatch]:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed + 1)
        for (index,) in self.rows:
            ids, mask = _trim(self.input_ids[index], self.attention_mask[index])
            images = None if self.image_tokens is None else self.image_tokens[index]
            masked = labels = None
            if "mlm" in config.objectives:
                masked, labels = mask_tokens(
                    ids,
                    mask_token_id=self.mask_token_id,
                    vocab_size=self.vocab_size,
                    special_ids=self.special_ids,
                    probability=config.mask_probability,
                    generator=generator,
                )
            itm = (None, None, None, None)
            if "itm" in config.objectives:
                itm = self._itm_pairs(index, ids, mask, generator)
            yield PretrainBatch(images, mask, masked, labels, *itm, config.positive_weight)

    def _itm_pairs(
        self, index: Tensor, ids: Tensor, mask: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The 3B pairs of a batch: positives, a negative text per image, a negative image
        per text (:func:`sample_negatives`; from the bank with ``caption_bank``)."""
        config = self.config
        u, v, scale = self.similarity_embeds
        queries = scale * u[index]  # (B, E), the batch's images, scaled
        sim = queries @ v[index].T  # (B, B) ITC logits
        group = None if self.caption_ids is None else self.caption_ids[index]
        hard = config.negatives == "hard"
        t4i, i4t = sample_negatives(
            sim, ids=group, hard=hard, temperature=config.temperature, generator=generator
        )
        image_index, text_index, labels = itm_triplets(t4i, i4t)
        texts, text_masks = ids[text_index], mask[text_index]
        if self.caption_bank is not None:  # the B (image, negative text) pairs: from the bank
            bank_ids, bank_mask, bank_embeds = self.caption_bank
            pool = self.negative_pool
            drawn = sample_bank_negatives(
                queries @ bank_embeds.T,  # (B, C)
                self.caption_ids[index],
                hard=hard,
                temperature=config.temperature,
                generator=generator,
                allowed=None if pool is None else pool[self.caption_ids[index]],
            )
            neg_ids, neg_mask = _trim(bank_ids[drawn], bank_mask[drawn])
            width = max(texts.shape[1], neg_ids.shape[1])
            texts = F.pad(texts, (0, width - texts.shape[1]))  # (3B, width), [PAD] = 0
            text_masks = F.pad(text_masks, (0, width - text_masks.shape[1]))  # mask 0
            B = len(index)
            texts[B : 2 * B] = F.pad(neg_ids, (0, width - neg_ids.shape[1]))
            text_masks[B : 2 * B] = F.pad(neg_mask, (0, width - neg_mask.shape[1]))
        return image_index, texts, text_masks, labels


# --- 6b. a cheap ITM head on frozen towers (for experiments over several seeds) -------------


class CrossAttentionMatcher(nn.Module):
    """An ITM head on *frozen* towers: fusion blocks from caption tokens to image tokens.

    ALBEF's fusion encoder without its own text layers: the caption's token states come
    from a frozen text tower (e.g. the ITC model's), pass ``num_layers``
    :class:`CrossAttentionBlock` s that cross-attend to the frozen image tokens, and a linear
    head on the [CLS] position gives the two ITM logits (column 1 = "match"). With both
    towers' outputs cached, one training step costs a few small matrix products, so the
    same comparison can be repeated over several seeds.

    Args:
        dim: D, the width of the text token states.
        image_dim: K, the width of the image tokens; None means D.
        num_heads: H, for both attentions.
        num_layers: fusion blocks.

    Taught in notebooks/07_pretraining_objectives.
    """

    def __init__(
        self, *, dim: int, image_dim: int | None = None, num_heads: int = 4, num_layers: int = 1
    ) -> None:
        super().__init__()
        positive_int(dim=dim, num_heads=num_heads, num_layers=num_layers)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dim=dim, num_heads=num_heads, image_dim=image_dim)
            for _ in range(num_layers)
        )
        self.itm_head = nn.Linear(dim, 2)  # PyTorch's default initialisation: BERT's N(0, 0.02)
        # starts these tiny heads on a long ln 2 plateau

    def forward(
        self, text_states: Tensor, image_tokens: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B, N, D) caption states, (B, M, K) image tokens, (B, N) mask -> (B, 2) ITM logits."""
        if text_states.dim() != 3 or image_tokens.dim() != 3:
            raise ValueError(
                "expected text_states (B, N, D) and image_tokens (B, M, K), got "
                f"{tuple(text_states.shape)} and {tuple(image_tokens.shape)}"
            )
        if text_states.shape[0] != image_tokens.shape[0]:
            raise ValueError(
                f"need one image per caption, got {image_tokens.shape[0]} images and "
                f"{text_states.shape[0]} captions"
            )
        pad = None if attention_mask is None else attention_mask == 0  # (B, N), True = padding
        x = text_states
        for block in self.blocks:
            x, _ = block(x, image_tokens, key_padding_mask=pad)  # (B, N, D)
        return self.itm_head(x[:, 0])  # (B, 2)


def itm_pairs(
    weights: Tensor, own: Tensor, *, epochs: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """ITM training pairs from a caption bank: each image once with its caption, once with a negative.

    Per epoch, image i appears twice: with its own caption ``own[i]`` (label 1) and with a
    caption drawn from row i of ``weights`` (label 0), e.g. :func:`bank_negative_weights`
    (random, ITC-mined, or restricted to :func:`attribute_neighbours`). The classes are
    balanced, so a pair-blind model sits at ln 2. Negatives are drawn afresh each epoch.

    Args:
        weights: (P, C) non-negative sampling weights, 0 on each image's own caption.
        own: (P,) the bank index of each image's caption.
        epochs: how many passes to draw.
        generator: for reproducible draws.

    Returns:
        ``(image_index, caption_index, labels)``, each (2 P epochs,) long.

    Taught in notebooks/07_pretraining_objectives.
    """
    P = own.shape[0]
    if weights.dim() != 2 or weights.shape[0] != P:
        raise ValueError(f"expected weights (P={P}, C), got {tuple(weights.shape)}")
    positive_int(epochs=epochs)
    own = own.long().cpu()
    if (weights.gather(1, own.to(weights.device)[:, None]) != 0).any():
        raise ValueError("weights must be 0 on each image's own caption (no false negatives)")
    images, captions, labels = [], [], []
    for _ in range(epochs):
        drawn = torch.multinomial(weights.float().cpu(), 1, generator=generator).squeeze(1)
        images.append(torch.arange(P).repeat(2))  # (2P,)
        captions.append(torch.cat([own, drawn]))  # positives, then negatives
        labels.append(torch.cat([torch.ones(P), torch.zeros(P)]).long())
    return torch.cat(images), torch.cat(captions), torch.cat(labels)


# --- 7. evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def _itm_logits(
    model: ImageTextEncoder,
    image_tokens: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    batch_size: int,
) -> Tensor:
    """The ITM logits of N (image, caption) pairs, in batches: (N, 2) float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        ids, mask = _trim(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
        logits = model.itm_logits(
            image_tokens[i : i + batch_size].to(device), ids.to(device), mask.to(device)
        )
        out.append(logits.float().cpu())
    return torch.cat(out)


def match_probability(
    model: ImageTextEncoder,
    image_tokens: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    batch_size: int = 512,
) -> Tensor:
    """p(match | image i, caption i) for N pairs, in batches: (N,) on the CPU.

    Taught in notebooks/07_pretraining_objectives.
    """
    logits = _itm_logits(model, image_tokens, input_ids, attention_mask, batch_size)  # (N, 2)
    return logits.softmax(-1)[:, 1]


def match_log_odds(
    model: ImageTextEncoder,
    image_tokens: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    batch_size: int = 512,
) -> Tensor:
    """The ITM log-odds ``logit_match - logit_no_match`` for N pairs: (N,) on the CPU.

    The ranking score for re-ranking: unlike the probability, it does not saturate at 1
    when several candidates all look like matches.

    Taught in notebooks/07_pretraining_objectives.
    """
    logits = _itm_logits(model, image_tokens, input_ids, attention_mask, batch_size)  # (N, 2)
    return logits[:, 1] - logits[:, 0]


def rerank(itc_scores: Tensor, itm_scores: Tensor, *, k: int, itc_weight: float = 0.0) -> Tensor:
    """Pick, for each query, the best of ITC's top-k by ``itm + itc_weight * itc``.

    ``itc_weight=0`` is ALBEF's re-ranking (the ITM score alone); BLIP adds the ITC
    similarity, so that ITM only overrides ITC where it is confident.

    Args:
        itc_scores: (Q, C) ITC scores of every candidate (they choose the shortlist).
        itm_scores: (Q, C) or (Q, k) ITM scores: of every candidate, or of the shortlist
            in ITC's order.
        k: the shortlist length.
        itc_weight: the weight of the ITC score in the fused score.

    Returns:
        (Q,) the chosen candidate indices.

    Taught in notebooks/07_pretraining_objectives.
    """
    positive_int(k=k)
    Q, C = itc_scores.shape
    if k > C:
        raise ValueError(f"k={k} is larger than the {C} candidates")
    top = itc_scores.topk(k, dim=1).indices  # (Q, k)
    if itm_scores.shape == (Q, C):
        itm_top = itm_scores.gather(1, top)
    elif itm_scores.shape == (Q, k):
        itm_top = itm_scores
    else:
        raise ValueError(
            f"itm_scores must be (Q, C)={(Q, C)} or (Q, k)={(Q, k)}, got {tuple(itm_scores.shape)}"
        )
    fused = itm_top + itc_weight * itc_scores.gather(1, top)  # (Q, k)
    return top.gather(1, fused.argmax(1, keepdim=True)).squeeze(1)


@torch.no_grad()
def predict_masked(
    model: ImageTextEncoder,
    image_tokens: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    batch_size: int = 512,
) -> Tensor:
    """The arg-max word at every position of (masked) captions: (N, L) ids on the CPU.

    Taught in notebooks/07_pretraining_objectives.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        images = None if image_tokens is None else image_tokens[i : i + batch_size].to(device)
        logits = model.mlm_logits(
            images,
            input_ids[i : i + batch_size].to(device),
            attention_mask[i : i + batch_size].to(device),
        )
        out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


def linear_probe_accuracy(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a logistic regression on frozen, standardised features.

    A *linear probe*: the features are fixed, only a linear classifier is fitted, so the
    accuracy measures what the representation makes linearly readable. Runs scikit-learn on
    one BLAS thread (``threadpoolctl``), which is fastest for problems this small.

    Args:
        train_features, test_features: (N, F) features.
        train_labels, test_labels: (N,) integer classes.
        C: inverse L2 regularisation strength.
        max_iter: solver iterations.

    Returns:
        The accuracy on the test set, in [0, 1].

    Taught in notebooks/07_pretraining_objectives.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def arr(x):
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    xtr, ytr, xte, yte = map(arr, (train_features, train_labels, test_features, test_labels))
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(
            f"expected (N, F) train and test features with the same F, got {xtr.shape} and {xte.shape}"
        )
    if ytr.shape != (xtr.shape[0],) or yte.shape != (xte.shape[0],):
        raise ValueError("expected one label per feature row")
    if len(np.unique(ytr)) < 2:
        raise ValueError("the training labels hold a single class: nothing to probe")
    with threadpool_limits(1):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        probe.fit(xtr, ytr)
        return float(probe.score(xte, yte))

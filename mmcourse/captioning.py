"""Image captioning and VQA: a ViT encoder and a Transformer decoder with cross-attention.

The captioner models a caption y = (y_1, ..., y_T) of an image x one token at a time,

    P(y | x; theta) = prod_t P(y_t | y_<t, x; theta),
    L(theta) = -log P(y | x; theta) = -sum_t log P(y_t | y_<t, x; theta),

the caption loss of 003 §4.2 with the condition the right way round (the source writes
``-log P(M_theta(x) | y)``, the model's output given the label). Training feeds the true
prefix y_<t at every position at once (**teacher forcing**), so one forward pass gives all
T next-token distributions; :func:`caption_loss` sums (or averages) their cross-entropies.

* the image encoder is chapter 04's :class:`~mmcourse.encoders.ViTEncoder`; its patch tokens
  (without [CLS]) are the decoder's *memory* (B, N, D);
* a :class:`DecoderBlock` is causal self-attention, cross-attention to the memory and an FFN,
  each with a residual and a LayerNorm: the same computation and parameter names as
  ``nn.TransformerDecoderLayer(batch_first=True)`` (:func:`load_from_torch_decoder_layer`
  copies one in; the tests check value and gradient);
* :meth:`Captioner.step` is the step function of :mod:`mmcourse.generation`: it takes the
  new tokens and a state with a **KV cache** (the keys and values of every earlier token in
  every layer) and the image memory's cross-attention keys and values, computed once by
  :meth:`Captioner.init_state`. Cached decoding equals recomputing the whole prefix;
* VQA two ways: :meth:`Captioner.answer_logits` classifies the decoder's state at the end
  of the question over a fixed answer vocabulary; or the same decoder, trained on
  ``question ? answer`` sequences with the loss on the answer only, generates the answer
  after the question as a prefix.

Axis letters: B batch, T tokens (T_past cached + T_new new), N image patches, D width,
H heads, Dh head width, L decoder layers, V vocabulary, A answers.

Taught in notebooks/10_captioning_and_vqa.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmcourse.attention import MultiHeadAttention, scaled_dot_product_attention
from mmcourse.encoders import (
    ACTIVATIONS,
    FeedForward,
    ViTConfig,
    ViTEncoder,
    init_weights,
    load_from_torch_layer,
)
from mmcourse.train import ShuffledBatches  # the course's one epoch sampler
from mmcourse.utils import fraction, one_of, positive_int

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum")


# --- the decoder block ---------------------------------------------------------------------


def _heads(x: Tensor, h: int) -> Tensor:
    return rearrange(x, "b t (h d) -> b h t d", h=h)  # (B, H, T, Dh)


class DecoderBlock(nn.Module):
    """One decoder block: causal self-attention, cross-attention to the image, FFN.

    ``norm_first=True`` (pre-norm, as GPT-2 and most recent decoders)::

        x = x + dropout1(self_attn(norm1(x)))                 # causal, over the tokens
        x = x + dropout2(multihead_attn(norm2(x), memory))     # queries: tokens; keys: patches
        x = x + dropout3(ffn(norm3(x)))

    ``norm_first=False`` (post-norm, the original Transformer) normalises after each sum.
    Names and numbers follow ``nn.TransformerDecoderLayer(batch_first=True)``.

    Args:
        dim: D, the width.
        num_heads: H; must divide ``dim``.
        hidden_dim: F, the FFN width.
        dropout: dropout on the residual branches, the attention weights and in the FFN.
        norm_first: pre-norm (True) or post-norm (False).
        activation: ``"gelu"`` or ``"relu"`` (torch's default).
        layer_norm_eps: the LayerNorms' epsilon.

    Taught in notebooks/10_captioning_and_vqa.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        hidden_dim: int,
        dropout: float = 0.0,
        norm_first: bool = True,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        positive_int(dim=dim, num_heads=num_heads, hidden_dim=hidden_dim)
        fraction(dropout=dropout)
        one_of("activation", activation, ACTIVATIONS)
        self.norm_first = bool(norm_first)
        self.self_attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.multihead_attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.ffn = FeedForward(
            dim=dim, hidden_dim=hidden_dim, dropout=dropout, activation=activation
        )
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """The cross-attention keys and values of the image memory: (B, N, D) -> 2 x (B, H, N, Dh).

        They do not depend on the tokens, so a decoder computes them once per image.
        """
        h = self.multihead_attn.num_heads
        k = _heads(self.multihead_attn.k_proj(memory), h)  # (B, H, N, Dh)
        v = _heads(self.multihead_attn.v_proj(memory), h)  # (B, H, N, Dh)
        return k, v

    def _attend(
        self,
        attn: MultiHeadAttention,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """softmax(q k^T / sqrt(Dh) + mask) v with q from ``x`` (B, T, D), then W^O."""
        q = _heads(attn.q_proj(x), attn.num_heads)  # (B, H, T, Dh)
        p = attn.dropout if self.training else 0.0
        if need_weights:
            o, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            o, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        return attn.out_proj(rearrange(o, "b h t d -> b t (h d)")), weights  # (B, T, D)

    def _self_block(self, x, mask, past, need_weights):
        h = self.self_attn.num_heads
        k = _heads(self.self_attn.k_proj(x), h)  # (B, H, T_new, Dh)
        v = _heads(self.self_attn.v_proj(x), h)
        if past is not None:  # the KV cache: keys and values of the T_past earlier tokens
            k = torch.cat([past[0], k], dim=2)  # (B, H, T_past + T_new, Dh)
            v = torch.cat([past[1], v], dim=2)
        out, _ = self._attend(self.self_attn, x, k, v, mask, False)
        return self.dropout1(out), (k, v)

    def forward(
        self,
        x: Tensor,
        *,
        memory: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        self_mask: Tensor | None = None,
        past_kv: tuple[Tensor, Tensor] | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        """Apply the block to T_new tokens.

        Args:
            x: (B, T_new, D) the new tokens.
            memory: (B, N, D) image tokens; or give ``memory_kv`` instead.
            memory_kv: the two (B, H, N, Dh) tensors of :meth:`memory_kv`.
            self_mask: boolean, True = may attend, broadcastable to (B, H, T_new, T_past +
                T_new); None = plain causal (only without ``past_kv``).
            past_kv: the cache, two (B, H, T_past, Dh) tensors, or None.
            need_weights: also return the cross-attention weights (B, H, T_new, N).

        Returns:
            ``(x, present_kv, cross_weights)``: (B, T_new, D); the cache extended by the new
            tokens, two (B, H, T_past + T_new, Dh); the weights or None.
        """
        if memory_kv is None:
            if memory is None:
                raise ValueError("DecoderBlock needs the image memory or its memory_kv")
            memory_kv = self.memory_kv(memory)
        if self_mask is None:
            if past_kv is not None:
                raise ValueError("with past_kv, pass the self_mask over past and new tokens")
            T = x.shape[1]
            self_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
        mk, mv = memory_kv
        if self.norm_first:
            a, present = self._self_block(self.norm1(x), self_mask, past_kv, need_weights)
            x = x + a
            c, weights = self._attend(
                self.multihead_attn, self.norm2(x), mk, mv, None, need_weights
            )
            x = x + self.dropout2(c)
            x = x + self.dropout3(self.ffn(self.norm3(x)))
        else:
            a, present = self._self_block(x, self_mask, past_kv, need_weights)
            x = self.norm1(x + a)
            c, weights = self._attend(self.multihead_attn, x, mk, mv, None, need_weights)
            x = self.norm2(x + self.dropout2(c))
            x = self.norm3(x + self.dropout3(self.ffn(x)))
        return x, present, weights


@torch.no_grad()
def load_from_torch_decoder_layer(block: DecoderBlock, layer: nn.TransformerDecoderLayer) -> None:
    """Copy an ``nn.TransformerDecoderLayer`` (``batch_first=True``) into a :class:`DecoderBlock`.

    ``self_attn`` and ``multihead_attn`` are split into W^Q, W^K, W^V by
    :meth:`MultiHeadAttention.from_torch`; ``linear1``/``linear2`` go into ``ffn``;
    ``norm1..3`` are copied as they are.

    Raises:
        ValueError: naming the first setting (width, heads, norm order, activation,
            epsilon) in which the two differ.

    Taught in notebooks/10_captioning_and_vqa.
    """
    load_from_torch_layer(block, layer)


# --- the captioner -------------------------------------------------------------------------


@dataclass
class CaptionerConfig:
    """Sizes of the captioner; the defaults train on a CPU in seconds.

    Taught in notebooks/10_captioning_and_vqa.
    """

    vocab_size: int  # V: the tokenizer's vocabulary, special tokens included
    num_answers: int = 0  # A > 0 adds the VQA classification head over A answers
    image_size: int = 32  # S: side of the input image in pixels
    patch_size: int = 8  # P: side of a patch; N = (S / P)^2 memory tokens
    dim: int = 64  # D: width of encoder and decoder
    encoder_layers: int = 2  # ViT blocks
    decoder_layers: int = 2  # decoder blocks
    num_heads: int = 4  # H: attention heads in every block
    mlp_ratio: float = 4.0  # FFN width F = mlp_ratio * D
    dropout: float = 0.0  # dropout everywhere (embeddings, residuals, attention weights)
    max_length: int = 40  # most tokens a sequence may hold (prompt and generated together)
    pad_token_id: int = 0  # [PAD] of the tokenizer
    bos_token_id: int = 2  # [CLS], the first token of every sequence
    eos_token_id: int = 3  # [SEP], ends a caption or an answer

    def __post_init__(self) -> None:
        positive_int(vocab_size=self.vocab_size, max_length=self.max_length)
        positive_int(decoder_layers=self.decoder_layers, encoder_layers=self.encoder_layers)
        if not isinstance(self.num_answers, int) or self.num_answers < 0:
            raise ValueError(f"num_answers must be an integer >= 0, got {self.num_answers!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be an id in [0, {self.vocab_size}), got {value!r}")
        self.vision_config()  # checks image_size, patch_size, dim, heads, dropout

    def vision_config(self) -> ViTConfig:
        """The :class:`ViTConfig` of the image encoder."""
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            dim=self.dim,
            num_layers=self.encoder_layers,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout,
        )


@dataclass
class DecoderOutput:
    """What :meth:`Captioner.decode` returns."""

    logits: Tensor  # (B, T, V) next-token logits at every position
    hidden: Tensor  # (B, T, D) the final (normalised) decoder states
    cross_attentions: tuple[Tensor, ...] | None = None  # per layer (B, H, T, N), if asked for


class Captioner(nn.Module):
    """ViT encoder + Transformer decoder: captions, and answers to questions about images.

    Taught in notebooks/10_captioning_and_vqa.
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        if not isinstance(config, CaptionerConfig):
            raise ValueError(f"config must be a CaptionerConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = ViTEncoder(c.vision_config())
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)  # word embeddings
        self.pos_embed = nn.Embedding(c.max_length, c.dim)  # learned positions
        self.dropout = nn.Dropout(c.dropout)
        hidden_dim = max(1, int(c.mlp_ratio * c.dim))
        self.blocks = nn.ModuleList(
            DecoderBlock(dim=c.dim, num_heads=c.num_heads, hidden_dim=hidden_dim, dropout=c.dropout)
            for _ in range(c.decoder_layers)
        )
        self.norm = nn.LayerNorm(c.dim)  # pre-norm blocks leave the stream un-normalised
        self.lm_head = nn.Linear(c.dim, c.vocab_size)  # next-token logits
        self.answer_head = nn.Linear(c.dim, c.num_answers) if c.num_answers else None
        for module in (self.token_embed, self.pos_embed, self.blocks, self.norm, self.lm_head):
            module.apply(init_weights)
        if self.answer_head is not None:
            self.answer_head.apply(init_weights)

    # -- inputs -----------------------------------------------------------------------------

    def _check_ids(self, input_ids: Tensor, attention_mask: Tensor | None, what: str) -> Tensor:
        if (
            not isinstance(input_ids, Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype != torch.long
        ):
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
            raise ValueError(f"expected {what} as int64 token ids of shape (B, T), got {shape}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"{what} is empty: give at least one token (the [CLS] start token)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"{what} holds ids outside [0, {self.config.vocab_size})")
        if attention_mask is None:
            return torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"expected attention_mask of shape {tuple(input_ids.shape)} (1 = token, "
                f"0 = padding), got {tuple(attention_mask.shape)}"
            )
        return attention_mask

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        if positions.max() >= self.config.max_length:
            raise ValueError(
                f"sequence longer than max_length={self.config.max_length} "
                "(CaptionerConfig.max_length); generate fewer tokens or raise it"
            )
        return self.dropout(self.token_embed(input_ids) + self.pos_embed(positions))  # (B, T, D)

    @staticmethod
    def _self_mask(attention_mask: Tensor, T_new: int) -> Tensor:
        """(B, 1, T_new, T_total) bool: causal, padding keys hidden, each token sees itself."""
        T_total = attention_mask.shape[1]
        device = attention_mask.device
        query = torch.arange(T_total - T_new, T_total, device=device)[:, None]  # (T_new, 1)
        key = torch.arange(T_total, device=device)[None, :]  # (1, T_total)
        causal = key <= query  # (T_new, T_total)
        valid = attention_mask.bool()[:, None, None, :] | (key == query)  # (B, 1, T_new, T_total)
        return causal & valid

    @staticmethod
    def positions(attention_mask: Tensor) -> Tensor:
        """Position of each token counted over real tokens only (left padding allowed)."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    # -- the encoder ------------------------------------------------------------------------

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> the memory: ViT patch tokens (B, N, D), [CLS] dropped."""
        return self.encoder(images).last_hidden_state[:, 1:]  # (B, N, D)

    # -- teacher forcing: the whole sequence at once ------------------------------------------

    def decode(
        self,
        input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None = None,
        *,
        need_weights: bool = False,
    ) -> DecoderOutput:
        """Run the decoder over whole sequences (teacher forcing, no cache).

        Args:
            input_ids: (B, T) int64, starting with [CLS].
            memory: (B, N, D) from :meth:`encode`.
            attention_mask: (B, T), 1 = token, 0 = padding (left or right); all ones if None.
            need_weights: also return the cross-attention weights.

        Returns:
            :class:`DecoderOutput` with logits (B, T, V) and hidden (B, T, D).
        """
        attention_mask = self._check_ids(input_ids, attention_mask, "input_ids")
        self._check_memory(memory, input_ids.shape[0])
        T = input_ids.shape[1]
        x = self._embed(input_ids, self.positions(attention_mask))  # (B, T, D)
        mask = self._self_mask(attention_mask, T)  # (B, 1, T, T)
        weights = []
        for block in self.blocks:
            x, _, w = block(x, memory=memory, self_mask=mask, need_weights=need_weights)
            weights.append(w)
        hidden = self.norm(x)  # (B, T, D)
        return DecoderOutput(self.lm_head(hidden), hidden, tuple(weights) if need_weights else None)

    def forward(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced next-token logits (B, T, V) for images (B, 3, S, S) and ids (B, T)."""
        return self.decode(input_ids, self.encode(images), attention_mask).logits

    def _check_memory(self, memory: Tensor, batch: int) -> None:
        D = self.config.dim
        if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[-1] != D:
            shape = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"expected image memory of shape (B, N, {D}), got {shape}")
        if memory.shape[0] != batch:
            raise ValueError(f"memory has batch size {memory.shape[0]} but the tokens {batch}")

    # -- VQA as classification ----------------------------------------------------------------

    def answer_logits(
        self,
        images: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        memory: Tensor | None = None,
    ) -> Tensor:
        """Answer logits (B, A): the decoder reads the question, its last state is classified.

        Args:
            images: (B, 3, S, S).
            input_ids: (B, T) ``[CLS] question [SEP]`` right-padded.
            attention_mask: (B, T), 1 = token; the last 1 of each row is read out.
            memory: (B, N, D) instead of ``images`` (a frozen, precomputed encoder).
        """
        if self.answer_head is None:
            raise ValueError("this Captioner has no answer head: build it with num_answers > 0")
        attention_mask = self._check_ids(input_ids, attention_mask, "input_ids")
        memory = self.encode(images) if memory is None else memory
        hidden = self.decode(input_ids, memory, attention_mask).hidden  # (B, T, D)
        last = attention_mask.long().sum(-1) - 1  # (B,) index of the last real token
        return self.answer_head(hidden[torch.arange(hidden.shape[0]), last])  # (B, A)

    # -- generation: the step function with a KV cache ------------------------------------------

    def init_state(self, images: Tensor | None = None, *, memory: Tensor | None = None) -> dict:
        """The decoding state before the first token: an empty cache and the memory's K, V.

        Args:
            images: (B, 3, S, S); or ``memory`` (B, N, D) directly.

        Returns:
            ``{"cross_k", "cross_v"}``: (B, L, H, N, Dh), the image keys and values of every
            layer, computed once here; ``{"self_k", "self_v"}``: (B, L, H, 0, Dh), the empty
            cache. Every entry is batch-first, so a decoder can expand it for beams and
            reorder it.
        """
        if memory is None:
            if images is None:
                raise ValueError("init_state needs images or memory")
            memory = self.encode(images)
        self._check_memory(memory, memory.shape[0] if isinstance(memory, Tensor) else -1)
        kv = [block.memory_kv(memory) for block in self.blocks]
        cross_k = torch.stack([k for k, _ in kv], dim=1)  # (B, L, H, N, Dh)
        cross_v = torch.stack([v for _, v in kv], dim=1)
        B, Lyr, H, _, Dh = cross_k.shape
        empty = cross_k.new_zeros(B, Lyr, H, 0, Dh)  # (B, L, H, 0, Dh)
        return {"cross_k": cross_k, "cross_v": cross_v, "self_k": empty, "self_v": empty.clone()}

    def step(
        self, input_ids: Tensor, state: dict, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, dict]:
        """One decoding step with the KV cache (the :mod:`mmcourse.generation` contract).

        Args:
            input_ids: (B, T_new) the new tokens (the whole prompt at the first call).
            state: from :meth:`init_state` or the previous step.
            attention_mask: (B, T_past + T_new), 1 = token, 0 = padding; all ones if None.

        Returns:
            ``(logits, state)``: (B, T_new, V) and the state with the cache extended.
        """
        if not isinstance(state, dict) or not {"cross_k", "self_k"} <= set(state):
            raise ValueError("state must come from Captioner.init_state (or a previous step)")
        T_past = state["self_k"].shape[3]
        B, T_new = (
            input_ids.shape if isinstance(input_ids, Tensor) and input_ids.dim() == 2 else (0, 0)
        )
        if attention_mask is None:
            attention_mask = torch.ones(
                B, T_past + T_new, dtype=torch.long, device=state["self_k"].device
            )
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (
            B,
            T_past + T_new,
        ):
            got = (
                tuple(attention_mask.shape)
                if isinstance(attention_mask, Tensor)
                else attention_mask
            )
            raise ValueError(
                f"expected attention_mask of shape (B, T_past + T_new) = {(B, T_past + T_new)}, "
                f"got {got}"
            )
        self._check_ids(input_ids, attention_mask[:, T_past:], "input_ids")
        if state["cross_k"].shape[0] != B:
            raise ValueError(f"state holds {state['cross_k'].shape[0]} sequences, input_ids {B}")
        positions = self.positions(attention_mask)[:, T_past:]  # (B, T_new)
        x = self._embed(input_ids, positions)  # (B, T_new, D)
        mask = self._self_mask(attention_mask, T_new)  # (B, 1, T_new, T_past + T_new)
        self_k, self_v = [], []
        for i, block in enumerate(self.blocks):
            past = (state["self_k"][:, i], state["self_v"][:, i])  # 2 x (B, H, T_past, Dh)
            memory_kv = (state["cross_k"][:, i], state["cross_v"][:, i])
            x, (k, v), _ = block(x, memory_kv=memory_kv, self_mask=mask, past_kv=past)
            self_k.append(k)
            self_v.append(v)
        logits = self.lm_head(self.norm(x))  # (B, T_new, V)
        new_state = dict(state)
        new_state["self_k"] = torch.stack(self_k, dim=1)  # (B, L, H, T_past + T_new, Dh)
        new_state["self_v"] = torch.stack(self_v, dim=1)
        return logits, new_state


# --- the loss ------------------------------------------------------------------------------


def caption_loss(
    logits: Tensor, input_ids: Tensor, loss_mask: Tensor, *, reduction: str = "mean"
) -> Tensor:
    """The caption loss: next-token cross-entropies under teacher forcing.

    Position t's logits predict token t + 1, so the targets are ``input_ids[:, 1:]`` and the
    logits ``logits[:, :-1]``; ``loss_mask[:, 1:]`` says which targets count (caption tokens
    and the closing [SEP]; not padding, not a question prefix).

        L = -sum_{b, t : mask[b, t+1]} log softmax(logits[b, t])[input_ids[b, t+1]]

    Args:
        logits: (B, T, V).
        input_ids: (B, T) the sequences fed in.
        loss_mask: (B, T) bool or 0/1: 1 where the token is a target.
        reduction: ``"sum"`` (the sum over tokens of 003 §4.2, per batch) or ``"mean"``
            (divided by the number of target tokens).

    Returns:
        A scalar.

    Taught in notebooks/10_captioning_and_vqa.
    """
    one_of("reduction", reduction, REDUCTIONS)
    if (
        logits.dim() != 3
        or logits.shape[:2] != input_ids.shape
        or loss_mask.shape != input_ids.shape
    ):
        raise ValueError(
            f"expected logits (B, T, V) and input_ids, loss_mask (B, T), got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)} and {tuple(loss_mask.shape)}"
        )
    targets = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), -100)  # (B, T-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B (T-1), V)
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / loss_mask[:, 1:].sum().clamp(min=1)


# --- data ----------------------------------------------------------------------------------


def encode_sequences(
    tokenizer, targets: Sequence[str], prefixes: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """``[CLS] prefix target [SEP]`` for each pair, right-padded, with the loss mask.

    Args:
        tokenizer: a :class:`mmcourse.clip.WordTokenizer` ([CLS] = BOS, [SEP] = EOS).
        targets: what the decoder learns to write (captions, or answers).
        prefixes: what it reads first (questions), or None (captions: no prefix).

    Returns:
        ``input_ids``, ``attention_mask`` and ``loss_mask``, (B, T) int64 each; ``loss_mask``
        is 1 on the target's tokens and the closing [SEP].

    Taught in notebooks/10_captioning_and_vqa.
    """
    if isinstance(targets, str) or len(targets) == 0:
        raise ValueError("targets must be a non-empty list of strings")
    prefixes = [""] * len(targets) if prefixes is None else list(prefixes)
    if len(prefixes) != len(targets):
        raise ValueError(f"got {len(targets)} targets but {len(prefixes)} prefixes")
    rows, masks = [], []
    for target, prefix in zip(targets, prefixes, strict=True):
        p = [tokenizer.token_to_id.get(w, tokenizer.unk_token_id) for w in tokenizer.split(prefix)]
        t = [tokenizer.token_to_id.get(w, tokenizer.unk_token_id) for w in tokenizer.split(target)]
        rows.append([tokenizer.cls_token_id, *p, *t, tokenizer.sep_token_id])
        masks.append([0] * (1 + len(p)) + [1] * (len(t) + 1))
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def encode_prompts(tokenizer, prompts: Sequence[str]) -> dict[str, Tensor]:
    """``[CLS] prompt`` (no [SEP]) for each prompt, **left**-padded, for generation.

    Args:
        tokenizer: a :class:`mmcourse.clip.WordTokenizer`.
        prompts: strings; ``""`` gives the bare start token (a caption prompt).

    Returns:
        ``input_ids`` and ``attention_mask``, (B, T) int64.

    Taught in notebooks/10_captioning_and_vqa.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    rows = [
        [tokenizer.cls_token_id]
        + [tokenizer.token_to_id.get(w, tokenizer.unk_token_id) for w in tokenizer.split(p)]
        for p in prompts
    ]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(r)
        attention_mask[i, T - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class SequenceBatches:
    """Shuffled (image, sequence) batches for :func:`mmcourse.train.fit`, trimmed to length.

    The rows come from :class:`mmcourse.train.ShuffledBatches` (the course's one epoch
    sampler: a fresh seeded permutation per epoch, the last partial batch dropped, made when
    iterated); each batch is then cut to the longest sequence it holds.

    Args:
        inputs: (M, 3, S, S) images or (M, N, D) memories, one per row of ``encoded``.
        encoded: ``input_ids``, ``attention_mask``, ``loss_mask`` (M, T) (e.g. from
            :func:`encode_sequences`); other (M, ...) tensors ride along.
        batch_size: rows per batch.
        num_batches: batches in one pass; ``None``: one epoch. More than an epoch continues
            with the next epoch's permutation.
        seed: seed of the permutations.
        key: the batch key of ``inputs``: ``"images"`` or ``"memory"``.

    Yields:
        Dicts with ``key`` and the ``encoded`` keys.

    Taught in notebooks/10_captioning_and_vqa.
    """

    def __init__(
        self,
        inputs: Tensor,
        encoded: dict[str, Tensor],
        *,
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
        key: str = "images",
    ) -> None:
        one_of("key", key, ("images", "memory"))
        if "attention_mask" not in encoded:
            raise ValueError(f"encoded needs an attention_mask, got keys {sorted(encoded)}")
        self.key, self.names = key, list(encoded)
        self.rows = ShuffledBatches(
            inputs, *encoded.values(), batch_size=batch_size, num_batches=num_batches, seed=seed
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for inputs, *columns in self.rows:
            encoded = dict(zip(self.names, columns, strict=True))
            width = int(encoded["attention_mask"].sum(-1).max())
            batch = {self.key: inputs}
            for name, value in encoded.items():
                batch[name] = value[:, :width] if value.dim() == 2 else value
            yield batch


sequence_batches = SequenceBatches  # the name chapters 10 and 13 call it by


def sequence_loss(model: Captioner, batch: dict[str, Tensor]) -> Tensor:
    """``loss_fn`` for :func:`mmcourse.train.fit`: the mean caption loss of a batch.

    The batch holds ``input_ids``, ``attention_mask``, ``loss_mask`` and either ``images``
    (the encoder runs and trains) or a precomputed ``memory`` (B, N, D) (a frozen encoder).

    Taught in notebooks/10_captioning_and_vqa.
    """
    memory = batch["memory"] if "memory" in batch else model.encode(batch["images"])
    logits = model.decode(batch["input_ids"], memory, batch["attention_mask"]).logits
    return caption_loss(logits, batch["input_ids"], batch["loss_mask"])


def answer_loss(model: Captioner, batch: dict[str, Tensor]) -> Tensor:
    """``loss_fn`` for :func:`mmcourse.train.fit`: cross-entropy of the VQA answer head.

    Taught in notebooks/10_captioning_and_vqa.
    """
    logits = model.answer_logits(
        batch.get("images"), batch["input_ids"], batch["attention_mask"], memory=batch.get("memory")
    )
    return F.cross_entropy(logits.float(), batch["answer"])


# --- generation -----------------------------------------------------------------------------


@torch.no_grad()
def generate_text(
    model: Captioner,
    tokenizer,
    *,
    images: Tensor | None = None,
    memory: Tensor | None = None,
    prompts: Sequence[str] | None = None,
    config=None,
    generator: torch.Generator | None = None,
) -> tuple[list[str], object]:
    """Captions (or answers) for a batch of images with :func:`mmcourse.generation.generate`.

    The prompt ``[CLS] prompt`` is left-padded (:func:`encode_prompts`); the state is
    :meth:`Captioner.init_state` (the image's cross-attention keys and values and an empty
    KV cache); :meth:`Captioner.step` is the step function.

    Args:
        model: the captioner (its ``config.eos_token_id`` ends a sequence unless ``config``
            names other stop ids).
        tokenizer: the :class:`mmcourse.clip.WordTokenizer` it was trained with.
        images: (B, 3, S, S); or ``memory`` (B, N, D) from :meth:`Captioner.encode`.
        prompts: B strings read before generating (questions); None: empty prompts (captions).
        config: a :class:`mmcourse.generation.GenerationConfig` (greedy, beam or sampling).
        generator: the random stream for sampling.

    Returns:
        ``(texts, output)``: R x B decoded strings (prompt-major, special tokens dropped)
        and the :class:`mmcourse.generation.GenerationOutput`.

    Taught in notebooks/10_captioning_and_vqa.
    """
    from dataclasses import replace

    from mmcourse.generation import GenerationConfig, generate

    if memory is None:
        if images is None:
            raise ValueError("generate_text needs images (B, 3, S, S) or memory (B, N, D)")
        memory = model.encode(images)
    B = memory.shape[0] if isinstance(memory, Tensor) else 0
    if prompts is None:
        prompts = [""] * B
    if isinstance(prompts, str) or len(prompts) != B:
        raise ValueError(f"expected one prompt string per image ({B}), got {prompts!r:.80}")
    config = GenerationConfig(max_new_tokens=32) if config is None else config
    if not isinstance(config, GenerationConfig):
        raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if config.eos_token_id is None:
        config = replace(config, eos_token_id=model.config.eos_token_id)
    if config.pad_token_id is None:
        config = replace(config, pad_token_id=model.config.pad_token_id)
    encoded = encode_prompts(tokenizer, prompts)
    device = memory.device
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    if ids.shape[1] + config.max_new_tokens > model.config.max_length:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds "
            f"CaptionerConfig.max_length={model.config.max_length}"
        )
    was_training = model.training
    model.eval()
    out = generate(
        model.step,
        ids,
        attention_mask=mask,
        state=model.init_state(memory=memory),
        config=config,
        generator=generator,
    )
    model.train(was_training)
    texts = [tokenizer.decode(row) for row in out.generated.cpu()]
    return texts, out


# --- a cheap vision pre-training: what is where -----------------------------------------------


def region_targets(objects: Sequence[list[dict]]) -> Tensor:
    """Per-region attribute labels of scenes: (N, 5, 3) int64 of (colour, shape, size) + 1.

    Region r is ``shapes.POSITIONS[r]``; 0 means "no object there".

    Taught in notebooks/10_captioning_and_vqa.
    """
    from mmcourse.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES

    targets = torch.zeros(len(objects), len(POSITIONS), 3, dtype=torch.long)
    for i, scene in enumerate(objects):
        for o in scene:
            r = POSITIONS.index(o["position"])
            targets[i, r, 0] = 1 + COLOURS.index(o["colour"])
            targets[i, r, 1] = 1 + SHAPES.index(o["shape"])
            targets[i, r, 2] = 1 + SIZES.index(o["size"])
    return targets


REGION_CLASSES = (7, 5, 3)  # classes of (colour, shape, size) per region, "empty" included


class RegionProbe(nn.Module):
    """A linear read-out of every region's colour, shape and size from the ViT patch tokens.

    Trains the image encoder cheaply (no decoder) before captioning: the patch tokens must
    say what is where. ``forward`` returns logits (B, 5, 15) = 7 colour, 5 shape, 3 size.

    Taught in notebooks/10_captioning_and_vqa.
    """

    def __init__(self, encoder: ViTEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        c = encoder.config
        self.head = nn.Linear(c.num_patches * c.dim, 5 * sum(REGION_CLASSES))

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.encoder(images).last_hidden_state[:, 1:]  # (B, N, D)
        return self.head(tokens.flatten(1)).view(-1, 5, sum(REGION_CLASSES))  # (B, 5, 15)


def region_loss(model: RegionProbe, batch: dict[str, Tensor]) -> Tensor:
    """``loss_fn`` for :func:`mmcourse.train.fit`: summed cross-entropies of the three attributes.

    Taught in notebooks/10_captioning_and_vqa.
    """
    logits = model(batch["images"])  # (B, 5, 15)
    targets = batch["regions"]  # (B, 5, 3)
    loss, start = logits.new_zeros(()), 0
    for j, n in enumerate(REGION_CLASSES):
        part = logits[..., start : start + n].reshape(-1, n).float()
        loss = loss + F.cross_entropy(part, targets[..., j].reshape(-1))
        start += n
    return loss


def region_accuracy(model: RegionProbe, images: Tensor, targets: Tensor) -> dict[str, float]:
    """Accuracy of the probe per attribute over all regions (empty ones included).

    Taught in notebooks/10_captioning_and_vqa.
    """
    with torch.no_grad():
        logits = model(images)
    out, start = {}, 0
    for j, (name, n) in enumerate(zip(("colour", "shape", "size"), REGION_CLASSES, strict=True)):
        pred = logits[..., start : start + n].argmax(-1)
        out[name] = (pred == targets[..., j].to(pred.device)).float().mean().item()
        start += n
    return out


__all__ = [
    "generate_text",
    "region_targets",
    "RegionProbe",
    "region_loss",
    "region_accuracy",
    "DecoderBlock",
    "load_from_torch_decoder_layer",
    "CaptionerConfig",
    "DecoderOutput",
    "Captioner",
    "caption_loss",
    "encode_sequences",
    "encode_prompts",
    "SequenceBatches",
    "sequence_batches",
    "sequence_loss",
    "answer_loss",
]

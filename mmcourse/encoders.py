"""Transformer encoders: the block (pre- and post-norm) and the image, text and audio towers.

A transformer encoder is a stack of identical blocks. Each block has two sublayers,
multi-head self-attention and a position-wise feed-forward network (FFN), and wraps each
in a residual connection and a layer normalisation (LN). The two orders in use:

    post-norm (original Transformer, BERT):  x = LN(x + Attn(x));   x = LN(x + FFN(x))
    pre-norm  (GPT-2, ViT, most recent):     x = x + Attn(LN(x));   x = x + FFN(LN(x))
    FFN(x) = W2 GELU(W1 x + b1) + b2

The same block builds three towers:

* :class:`ViTEncoder`: images (B, C, S, S) -> P x P patches -> [CLS] + patch tokens -> blocks;
* :class:`TextEncoder`: token ids (B, N) -> word + position + type embeddings -> blocks, BERT
  exactly (same parameters, same numbers: :func:`load_from_bert`);
* :class:`AudioEncoder`: log-mel (B, J, M) -> frames or spectrogram patches -> blocks.

:func:`load_from_torch_layer` copies an ``nn.TransformerEncoderLayer`` into a
:class:`TransformerBlock`; the tests check both give the same values and gradients.

Axis letters: B batch, N tokens ([CLS] included where a tower has one), D width, H heads,
F FFN width (``hidden_dim``), C channels, S image side, P patch side, J mel bands, M frames.

Taught in notebooks/04_transformer_encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmcourse.attention import MultiHeadAttention
from mmcourse.positional import sincos_2d_encoding, sinusoidal_encoding
from mmcourse.utils import fraction, one_of, positive_float, positive_int

if TYPE_CHECKING:
    from transformers import BertConfig, BertModel

ACTIVATIONS = ("gelu", "relu")
POSITIONS = ("sincos", "learned")
POOLS = ("cls", "mean")


def _check_heads(dim: int, num_heads: int) -> None:
    positive_int(dim=dim, num_heads=num_heads)
    if dim % num_heads:
        raise ValueError(
            f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}"
        )


# --- the building blocks -----------------------------------------------------------------


class FeedForward(nn.Module):
    """Position-wise feed-forward network: FFN(x) = W2 act(W1 x + b1) + b2.

    The same two-layer MLP is applied to every token independently. ``linear1`` holds
    (W1, b1), ``linear2`` holds (W2, b2), as in ``nn.TransformerEncoderLayer``.

    Args:
        dim: D, the token width (input and output).
        hidden_dim: F, the width of the hidden layer (4 D in BERT and ViT).
        dropout: dropout on the hidden activations (between the two layers).
        activation: ``"gelu"`` (exact, erf form: BERT, ViT) or ``"relu"`` (original Transformer).

    Taught in notebooks/04_transformer_encoders.
    """

    def __init__(
        self, *, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "gelu"
    ) -> None:
        super().__init__()
        positive_int(dim=dim, hidden_dim=hidden_dim)
        fraction(dropout=dropout)
        one_of("activation", activation, ACTIVATIONS)
        self.linear1 = nn.Linear(dim, hidden_dim)  # W1, b1
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden_dim, dim)  # W2, b2

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        h = self.dropout(self.activation(self.linear1(x)))  # (B, N, F)
        return self.linear2(h)  # (B, N, D)


class TransformerBlock(nn.Module):
    """One encoder block: self-attention and FFN, each with a residual and a LayerNorm.

    ``norm_first=False`` (post-norm, BERT)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(ffn(x)))

    ``norm_first=True`` (pre-norm, ViT)::

        x = x + dropout1(self_attn(norm1(x)))
        x = x + dropout2(ffn(norm2(x)))

    The sublayer names follow ``nn.TransformerEncoderLayer`` (``self_attn``, ``norm1``,
    ``norm2``, ``dropout1``, ``dropout2``; the FFN's ``linear1``/``linear2`` sit in ``ffn``);
    :func:`load_from_torch_layer` copies such a layer's weights in.

    Args:
        dim: D, the token width.
        num_heads: H, attention heads; must divide ``dim``.
        hidden_dim: F, the FFN width; None means ``int(mlp_ratio * dim)``.
        mlp_ratio: F / D when ``hidden_dim`` is None.
        dropout: dropout on both residual branches (and the default of the two below).
        attention_dropout: dropout on the attention weights; None means ``dropout``.
        activation_dropout: dropout inside the FFN; None means ``dropout`` (BERT: 0).
        norm_first: pre-norm (True) or post-norm (False).
        activation: FFN non-linearity, ``"gelu"`` or ``"relu"``.
        layer_norm_eps: epsilon of both LayerNorms (torch 1e-5, BERT 1e-12, ViT 1e-6).

    Taught in notebooks/04_transformer_encoders.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        hidden_dim: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
        norm_first: bool = True,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        if hidden_dim is None:
            positive_float(mlp_ratio=mlp_ratio)
            hidden_dim = max(1, int(mlp_ratio * dim))
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        activation_dropout = dropout if activation_dropout is None else activation_dropout
        fraction(
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation_dropout=activation_dropout,
        )
        positive_float(layer_norm_eps=layer_norm_eps)
        if not isinstance(norm_first, bool):
            raise ValueError(
                f"norm_first must be True (pre-norm) or False (post-norm), got {norm_first!r}"
            )
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=attention_dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ffn = FeedForward(
            dim=dim, hidden_dim=hidden_dim, dropout=activation_dropout, activation=activation
        )
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)

    def _attention(
        self, x: Tensor, key_padding_mask: Tensor | None, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        out, weights = self.self_attn(
            x, key_padding_mask=key_padding_mask, need_weights=need_weights
        )
        return self.dropout1(out), weights  # (B, N, D), (B, H, N, N) or None

    def forward(
        self, x: Tensor, *, key_padding_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Apply the block.

        Args:
            x: (B, N, D) tokens.
            key_padding_mask: (B, N) bool, True where a token is padding (it is not
                attended to), as in ``nn.TransformerEncoderLayer``'s ``src_key_padding_mask``.
            need_weights: also return the attention weights.

        Returns:
            ``(x, weights)``: (B, N, D) and the (B, H, N, N) attention weights, or None.
        """
        if self.norm_first:  # pre-norm: the residual stream x itself is never normalised
            a, weights = self._attention(self.norm1(x), key_padding_mask, need_weights)
            x = x + a
            x = x + self.dropout2(self.ffn(self.norm2(x)))
        else:  # post-norm: normalise after adding each residual
            a, weights = self._attention(x, key_padding_mask, need_weights)
            x = self.norm1(x + a)
            x = self.norm2(x + self.dropout2(self.ffn(x)))
        return x, weights


def _activation_name(activation) -> str:
    """The name of an FFN activation: "relu", "gelu" (exact), or its repr for others."""
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (
        isinstance(activation, nn.GELU) and activation.approximate == "none"
    ):
        return "gelu"
    return repr(activation)


@torch.no_grad()
def load_from_torch_layer(
    block: nn.Module, layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer
) -> None:
    """Copy the weights of an ``nn.TransformerEncoderLayer`` into a :class:`TransformerBlock`
    (or of an ``nn.TransformerDecoderLayer`` into a block with cross-attention).

    The mapping (D = width)::

        torch layer                          block
        self_attn.in_proj_weight[0:D]    ->  self_attn.q_proj.weight     (W^Q)
        self_attn.in_proj_weight[D:2D]   ->  self_attn.k_proj.weight     (W^K)
        self_attn.in_proj_weight[2D:3D]  ->  self_attn.v_proj.weight     (W^V)
        self_attn.in_proj_bias           ->  the three biases, split the same way
        self_attn.out_proj               ->  self_attn.out_proj          (W^O)
        multihead_attn (decoder only)    ->  multihead_attn, split the same way
        linear1, linear2                 ->  ffn.linear1, ffn.linear2    (W1, b1), (W2, b2)
        norm1, norm2 (, norm3)           ->  norm1, norm2 (, norm3)

    Args:
        block: the destination; its sizes, ``norm_first`` (a block without that attribute
            is post-norm), activation and LayerNorm epsilon must match the layer's
            (otherwise the copy would compute something else).
        layer: the source; built with ``batch_first=True`` to take the same inputs.

    Raises:
        ValueError: naming the first setting that differs.

    Taught in notebooks/04_transformer_encoders (and, for the decoder layer,
    notebooks/07_pretraining_objectives and notebooks/10_captioning_and_vqa).
    """
    D = block.norm1.normalized_shape[0]
    checks = [
        ("width", layer.linear1.in_features, D),
        ("FFN width", layer.linear1.out_features, block.ffn.linear1.out_features),
        ("num_heads", layer.self_attn.num_heads, block.self_attn.num_heads),
        ("norm_first", layer.norm_first, getattr(block, "norm_first", False)),
        ("layer_norm_eps", layer.norm1.eps, block.norm1.eps),
    ]
    for name, theirs, ours in checks:
        if theirs != ours:
            raise ValueError(f"cannot copy: the torch layer has {name}={theirs}, the block {ours}")
    theirs_act = _activation_name(layer.activation)
    ours_act = _activation_name(block.ffn.activation)
    if theirs_act != ours_act:
        raise ValueError(
            f"cannot copy: the activation differs: the torch layer uses {theirs_act}, "
            f"the block {ours_act}"
        )
    # the attention's split of in_proj into W^Q, W^K, W^V is MultiHeadAttention.from_torch's
    attentions = [(block.self_attn, layer.self_attn)]
    pairs = [
        (block.ffn.linear1, layer.linear1),
        (block.ffn.linear2, layer.linear2),
        (block.norm1, layer.norm1),
        (block.norm2, layer.norm2),
    ]
    if isinstance(layer, nn.TransformerDecoderLayer):
        attentions.append((block.multihead_attn, layer.multihead_attn))
        pairs.append((block.norm3, layer.norm3))
    for ours, theirs in attentions:
        ours.load_state_dict(MultiHeadAttention.from_torch(theirs).state_dict())
    for ours, theirs in pairs:
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)


@dataclass
class EncoderOutput:
    """What every tower returns (like ``transformers``' ``BaseModelOutputWithPooling``)."""

    last_hidden_state: Tensor  # (B, N, D): every token after the last block (and final norm)
    pooled: Tensor  # (B, D): one vector per input ([CLS] token, BERT pooler or mean)
    attentions: tuple[Tensor, ...] | None = None  # one (B, H, N, N) per block, if asked for
    logits: Tensor | None = None  # (B, num_classes) when the config has a classifier head


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm scales.

    Apply it with ``module.apply(init_weights)``; the course's other transformer models
    (``captioning``, ``pretraining``) start from it too.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_patch_model(model: nn.Module) -> None:
    """ViT/MAE initialisation: N(0, 0.02) everywhere, but the patch embedding Xavier-uniform
    as the Linear it is (so patch content is not drowned by the position table)."""
    model.apply(init_weights)
    weight = model.patch_embed.weight  # (D, C, kh, kw), a Linear over flattened patches
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.normal_(model.cls_token, std=0.02)
    if isinstance(model.pos_embed, nn.Parameter):
        nn.init.normal_(model.pos_embed, std=0.02)


def _blocks(
    *,
    num_layers: int,
    dim: int,
    num_heads: int,
    hidden_dim: int,
    dropout: float,
    attention_dropout: float | None = None,
    activation_dropout: float | None = None,
    norm_first: bool,
    activation: str,
    layer_norm_eps: float,
) -> nn.ModuleList:
    positive_int(num_layers=num_layers)
    return nn.ModuleList(
        TransformerBlock(
            dim=dim,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation_dropout=activation_dropout,
            norm_first=norm_first,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
        )
        for _ in range(num_layers)
    )


def _run_blocks(
    blocks: nn.ModuleList, x: Tensor, key_padding_mask: Tensor | None, output_attentions: bool
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    attentions = []
    for block in blocks:
        x, weights = block(x, key_padding_mask=key_padding_mask, need_weights=output_attentions)
        attentions.append(weights)
    return x, tuple(attentions) if output_attentions else None


def _check_tower_config(cfg, *, patch_tower: bool = True) -> None:
    """Checks shared by the tower configs; ``patch_tower``: also the ViT/audio-only fields."""
    _check_heads(cfg.dim, cfg.num_heads)
    positive_int(num_layers=cfg.num_layers)
    fraction(dropout=cfg.dropout)
    one_of("activation", cfg.activation, ACTIVATIONS)
    positive_float(layer_norm_eps=cfg.layer_norm_eps)
    if patch_tower:
        positive_float(mlp_ratio=cfg.mlp_ratio)
        one_of("position", cfg.position, POSITIONS)
        one_of("pool", cfg.pool, POOLS)
        if not isinstance(cfg.num_classes, int) or cfg.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {cfg.num_classes!r}")


# --- the image tower: a Vision Transformer -----------------------------------------------


@dataclass
class ViTConfig:
    """Sizes of a Vision Transformer (ViT). The defaults train on a CPU in seconds.

    Taught in notebooks/04_transformer_encoders.
    """

    image_size: int = 32  # S: side of the square input image in pixels
    patch_size: int = 8  # P: side of a square patch; must divide image_size
    in_channels: int = 3  # C: 3 for RGB, 1 for grey
    dim: int = 64  # D: token width
    num_layers: int = 4  # number of transformer blocks
    num_heads: int = 4  # H: attention heads; must divide dim
    mlp_ratio: float = 4.0  # FFN width F = mlp_ratio * D
    dropout: float = 0.0  # dropout on the embeddings, residual branches and attention weights
    norm_first: bool = True  # pre-norm blocks (ViT) or post-norm (original Transformer)
    activation: str = "gelu"  # FFN non-linearity: "gelu" or "relu"
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon (the ViT paper's code uses 1e-6)
    position: str = "sincos"  # "sincos": fixed 2-D sin-cos (MAE); "learned": a trained table
    pool: str = "cls"  # pooled output: the [CLS] token ("cls") or the mean of patch tokens
    num_classes: int = 0  # > 0 adds a linear classifier on the pooled output (``logits``)

    def __post_init__(self) -> None:
        _check_tower_config(self)
        positive_int(image_size=self.image_size, patch_size=self.patch_size)
        positive_int(in_channels=self.in_channels)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                "patches must tile the image"
            )
        if self.position == "sincos" and self.dim % 4:
            raise ValueError(
                f"position='sincos' needs dim divisible by 4 (2-D sin-cos), got dim={self.dim}"
            )

    @property
    def grid_size(self) -> int:
        """Patches along one side, S / P."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N - 1 = (S / P)^2 patch tokens (the [CLS] token comes on top)."""
        return self.grid_size**2

    @property
    def hidden_dim(self) -> int:
        """F, the FFN width."""
        return max(1, int(self.mlp_ratio * self.dim))


class ViTEncoder(nn.Module):
    """A Vision Transformer: patches -> [CLS] + positions -> blocks -> final norm -> pooled.

    The patch embedding is a Conv2d with kernel and stride P: the same as flattening each
    patch (``mmcourse.modalities.patchify``) and applying one Linear (chapter 01).

    Taught in notebooks/04_transformer_encoders.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(
            c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))  # (1, 1, D)
        if c.position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.dim))  # (1, N, D)
        else:  # fixed 2-D sin-cos for the patches; [CLS] gets the zero vector (as in MAE)
            grid = sincos_2d_encoding(c.grid_size, c.grid_size, c.dim)  # (N - 1, D)
            table = torch.cat([torch.zeros(1, c.dim), grid.float()])  # (N, D)
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = _blocks(
            num_layers=c.num_layers,
            dim=c.dim,
            num_heads=c.num_heads,
            hidden_dim=c.hidden_dim,
            dropout=c.dropout,
            norm_first=c.norm_first,
            activation=c.activation,
            layer_norm_eps=c.layer_norm_eps,
        )
        # Pre-norm leaves the residual stream un-normalised: one LayerNorm at the end.
        # Post-norm blocks already end in a LayerNorm.
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes else None
        _init_patch_model(self)

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            hint = ""
            if images.dim() == 4 and images.shape[-1] == c.in_channels:
                hint = " (channels last? use images.permute(0, 3, 1, 2))"
            elif images.dim() == 4 and images.shape[1] == c.in_channels:
                hint = f" (resize or crop to {c.image_size}x{c.image_size}, or change ViTConfig.image_size)"
            raise ValueError(
                f"expected image batch of shape (B, {c.in_channels}, {c.image_size}, "
                f"{c.image_size}) (ViTConfig: in_channels, image_size), got "
                f"{tuple(images.shape)}{hint}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"expected floating-point images, got dtype {images.dtype} "
                "(convert uint8 pixels with images.float() / 255)"
            )

    def forward(self, images: Tensor, *, output_attentions: bool = False) -> EncoderOutput:
        """Encode a batch of images.

        Args:
            images: (B, C, S, S) float.
            output_attentions: also return every block's attention weights.

        Returns:
            :class:`EncoderOutput` with ``last_hidden_state`` (B, 1 + (S/P)^2, D), token 0
            being [CLS]; ``pooled`` (B, D); ``attentions``; ``logits`` if ``num_classes``.
        """
        self._check_images(images)
        x = self.patch_embed(images)  # (B, D, S/P, S/P)
        x = rearrange(x, "b d h w -> b (h w) d")  # (B, N - 1, D), patches in reading order
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N, D)
        x, attentions = _run_blocks(self.blocks, self.dropout(x), None, output_attentions)
        x = self.norm(x)  # (B, N, D)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        logits = self.head(pooled) if self.head is not None else None
        return EncoderOutput(x, pooled, attentions, logits)


# --- the text tower: BERT ----------------------------------------------------------------


@dataclass
class TextEncoderConfig:
    """Sizes of a BERT text encoder; the defaults are all-MiniLM-L6-v2's.

    Field for field a ``transformers.BertConfig`` (names in brackets):
    :meth:`from_bert_config` and :meth:`to_bert_config` convert.

    Taught in notebooks/04_transformer_encoders.
    """

    vocab_size: int = 30522  # rows of the word-embedding table (vocab_size)
    max_position_embeddings: int = 512  # longest sequence, rows of the position table
    type_vocab_size: int = 2  # token types / segments, rows of the type table
    dim: int = 384  # D: token width (hidden_size)
    num_layers: int = 6  # transformer blocks (num_hidden_layers)
    num_heads: int = 12  # H: attention heads (num_attention_heads)
    hidden_dim: int = 1536  # F: FFN width (intermediate_size)
    dropout: float = 0.1  # embeddings and residual branches (hidden_dropout_prob)
    attention_dropout: float = 0.1  # attention weights (attention_probs_dropout_prob)
    activation: str = "gelu"  # FFN non-linearity (hidden_act)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (layer_norm_eps)
    pad_token_id: int = 0  # id of [PAD]; its word embedding starts at zero (pad_token_id)
    add_pooling_layer: bool = True  # BERT's pooler tanh(W h_[CLS] + b), as BertModel's default

    def __post_init__(self) -> None:
        _check_tower_config(self, patch_tower=False)
        positive_int(vocab_size=self.vocab_size, hidden_dim=self.hidden_dim)
        positive_int(max_position_embeddings=self.max_position_embeddings)
        positive_int(type_vocab_size=self.type_vocab_size)
        fraction(attention_dropout=self.attention_dropout)
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}"
            )

    @classmethod
    def from_bert_config(
        cls, bert: BertConfig, *, add_pooling_layer: bool = True
    ) -> TextEncoderConfig:
        """The config that matches a ``transformers.BertConfig``."""
        if getattr(bert, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                "only absolute position embeddings are supported, got "
                f"position_embedding_type={bert.position_embedding_type!r}"
            )
        return cls(
            vocab_size=bert.vocab_size,
            max_position_embeddings=bert.max_position_embeddings,
            type_vocab_size=bert.type_vocab_size,
            dim=bert.hidden_size,
            num_layers=bert.num_hidden_layers,
            num_heads=bert.num_attention_heads,
            hidden_dim=bert.intermediate_size,
            dropout=bert.hidden_dropout_prob,
            attention_dropout=bert.attention_probs_dropout_prob,
            activation=bert.hidden_act,
            layer_norm_eps=bert.layer_norm_eps,
            pad_token_id=bert.pad_token_id if bert.pad_token_id is not None else 0,
            add_pooling_layer=add_pooling_layer,
        )

    def to_bert_config(self) -> BertConfig:
        """The matching ``transformers.BertConfig`` (build a ``BertModel`` from it to compare)."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.hidden_dim,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.attention_dropout,
            hidden_act=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
        )


class TextEmbeddings(nn.Module):
    """BERT's input layer: h0_i = LayerNorm(E_word[w_i] + E_pos[i] + E_type[t_i]), then dropout."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.dim, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.dim)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.dim)
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(B, N) ids and types -> (B, N, D)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (N,)
        x = (
            self.word_embeddings(input_ids)  # (B, N, D)
            + self.position_embeddings(positions)  # (N, D), broadcast over B
            + self.token_type_embeddings(token_type_ids)  # (B, N, D)
        )
        return self.dropout(self.norm(x))


class TextEncoder(nn.Module):
    """A BERT text encoder built from :class:`TransformerBlock` (post-norm, like BERT).

    Same parameters as ``transformers.BertModel`` of the matching config (pooler included
    when ``add_pooling_layer``, as ``BertModel``'s default); :func:`load_from_bert` copies a
    ``BertModel``'s weights in and the outputs are then the same.

    Taught in notebooks/04_transformer_encoders.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embeddings = TextEmbeddings(c)
        self.blocks = _blocks(
            num_layers=c.num_layers,
            dim=c.dim,
            num_heads=c.num_heads,
            hidden_dim=c.hidden_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            activation_dropout=0.0,  # BERT has no dropout between the two FFN layers
            norm_first=False,  # BERT is post-norm
            activation=c.activation,
            layer_norm_eps=c.layer_norm_eps,
        )
        self.pooler = nn.Linear(c.dim, c.dim) if c.add_pooling_layer else None
        self.apply(init_weights)

    def _check_token_values(self, input_ids: Tensor, token_type_ids: Tensor | None) -> None:
        c = self.config
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
            raise ValueError(
                f"token ids must be in [0, vocab_size={c.vocab_size}), got ids from "
                f"{int(input_ids.min())} to {int(input_ids.max())}"
            )
        if token_type_ids is not None and token_type_ids.numel():
            if token_type_ids.min() < 0 or token_type_ids.max() >= c.type_vocab_size:
                raise ValueError(
                    f"token_type_ids must be in [0, type_vocab_size={c.type_vocab_size}), got "
                    f"{int(token_type_ids.min())} to {int(token_type_ids.max())}"
                )

    def check_inputs(
        self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None
    ) -> None:
        """Raise ``ValueError`` unless the ids, mask and types have the shapes and ranges
        this encoder takes (public, so that a model wrapping it checks at its boundary)."""
        c = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"expected input_ids of shape (B, N) with integer dtype, got "
                f"{tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens is longer than max_position_embeddings="
                f"{c.max_position_embeddings}; truncate it (tokenizer(..., truncation=True))"
            )
        # the value checks read the data, which an exported graph (torch.export, ONNX) cannot
        if not torch.compiler.is_exporting():
            self._check_token_values(input_ids, token_type_ids)
        for name, other in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(
                    f"expected {name} of the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(other.shape)}"
                )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Encode a batch of token ids (the tokenizer's output, like ``BertModel``).

        Args:
            input_ids: (B, N) token ids.
            attention_mask: (B, N), 1 for real tokens and 0 for padding; None: no padding.
            token_type_ids: (B, N) segment ids; None: all 0.
            output_attentions: also return every block's attention weights.

        Returns:
            :class:`EncoderOutput`: ``last_hidden_state`` (B, N, D); ``pooled`` (B, D), the
            pooler's tanh(W h_[CLS] + b) (BertModel's ``pooler_output``) or, without a
            pooler, h_[CLS] itself; ``attentions``.
        """
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # The tokenizer's attention_mask is 1 = keep; the blocks take True = padding.
        key_padding_mask = None if attention_mask is None else attention_mask == 0  # (B, N)
        x = self.embeddings(input_ids, token_type_ids)  # (B, N, D)
        x, attentions = _run_blocks(self.blocks, x, key_padding_mask, output_attentions)
        cls = x[:, 0]  # (B, D)
        pooled = torch.tanh(self.pooler(cls)) if self.pooler is not None else cls
        return EncoderOutput(x, pooled, attentions)


def bert_weight_map(config: TextEncoderConfig) -> dict[str, str]:
    """Which ``BertModel`` parameter each :class:`TextEncoder` parameter corresponds to.

    Returns:
        ``{our name: BertModel name}``, e.g. ``"blocks.0.self_attn.q_proj.weight" ->
        "encoder.layer.0.attention.self.query.weight"``; one entry per parameter.

    Taught in notebooks/04_transformer_encoders.
    """
    names = {
        "embeddings.word_embeddings": "embeddings.word_embeddings",
        "embeddings.position_embeddings": "embeddings.position_embeddings",
        "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
        "embeddings.norm": "embeddings.LayerNorm",
    }
    per_block = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "ffn.linear1": "intermediate.dense",
        "ffn.linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }
    for i in range(config.num_layers):
        for ours, theirs in per_block.items():
            names[f"blocks.{i}.{ours}"] = f"encoder.layer.{i}.{theirs}"
    if config.add_pooling_layer:
        names["pooler"] = "pooler.dense"
    mapping = {}
    for ours, theirs in names.items():
        params = ("weight",) if "embeddings" in ours and "norm" not in ours else ("weight", "bias")
        for p in params:
            mapping[f"{ours}.{p}"] = f"{theirs}.{p}"
    return mapping


@torch.no_grad()
def load_from_bert(encoder: TextEncoder, bert: BertModel) -> None:
    """Copy a ``transformers.BertModel``'s weights into a :class:`TextEncoder` (see
    :func:`bert_weight_map` for the correspondence).

    Raises:
        ValueError: the configs differ, or a parameter is missing on either side.

    Taught in notebooks/04_transformer_encoders.
    """
    c = encoder.config
    expected = TextEncoderConfig.from_bert_config(
        bert.config, add_pooling_layer=c.add_pooling_layer
    )
    for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "dim", "num_layers"):
        if getattr(expected, name) != getattr(c, name):
            raise ValueError(
                f"cannot copy: the BertModel has {name}={getattr(expected, name)}, "
                f"the TextEncoder {getattr(c, name)}"
            )
    for name in ("num_heads", "hidden_dim", "activation", "layer_norm_eps"):
        if getattr(expected, name) != getattr(c, name):
            raise ValueError(
                f"cannot copy: the BertModel has {name}={getattr(expected, name)!r}, "
                f"the TextEncoder {getattr(c, name)!r}"
            )
    theirs = dict(bert.named_parameters())
    mapping = bert_weight_map(c)
    missing = [t for t in mapping.values() if t not in theirs]
    if missing:
        raise ValueError(
            f"cannot copy: the BertModel lacks {missing[:3]} (built without a pooler?)"
        )
    state = {ours: theirs[t] for ours, t in mapping.items()}
    encoder.load_state_dict(state, strict=True)


# --- the audio tower ---------------------------------------------------------------------


@dataclass
class AudioEncoderConfig:
    """Sizes of an audio transformer over log-mel spectrograms.

    A token is a patch of ``patch_mels`` bands x ``patch_frames`` frames. The default
    (all bands, one frame) makes one token per 10 ms frame, as speech models do;
    smaller ``patch_mels`` cuts the spectrogram into patches like an image (the Audio
    Spectrogram Transformer).

    Taught in notebooks/04_transformer_encoders.
    """

    n_mels: int = 40  # J: mel bands of the input
    max_frames: int = 101  # M: longest input in frames (101 = 1 s at a 10 ms hop)
    patch_mels: int | None = None  # bands per token; None: all n_mels (a token is a frame)
    patch_frames: int = 1  # frames per token; leftover frames at the end are dropped
    dim: int = 64  # D: token width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # H: attention heads; must divide dim
    mlp_ratio: float = 4.0  # FFN width F = mlp_ratio * D
    dropout: float = 0.0  # dropout on the embeddings, residual branches and attention weights
    norm_first: bool = True  # pre-norm blocks (True) or post-norm (False)
    activation: str = "gelu"  # FFN non-linearity: "gelu" or "relu"
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon
    position: str = "sincos"  # "sincos": fixed (1-D over frames, 2-D over patches); "learned"
    pool: str = "cls"  # pooled output: the [CLS] token ("cls") or the mean of the tokens
    num_classes: int = 0  # > 0 adds a linear classifier on the pooled output (``logits``)

    def __post_init__(self) -> None:
        _check_tower_config(self)
        positive_int(n_mels=self.n_mels, max_frames=self.max_frames)
        positive_int(patch_frames=self.patch_frames)
        if self.patch_mels is not None:
            positive_int(patch_mels=self.patch_mels)
            if self.n_mels % self.patch_mels:
                raise ValueError(
                    f"n_mels={self.n_mels} is not divisible by patch_mels={self.patch_mels}"
                )
        if self.patch_frames > self.max_frames:
            raise ValueError(
                f"patch_frames={self.patch_frames} is longer than max_frames={self.max_frames}"
            )
        need = 2 if self.grid[0] == 1 else 4  # 1-D sin-cos over frames, 2-D over patches
        if self.position == "sincos" and self.dim % need:
            raise ValueError(
                f"position='sincos' needs dim divisible by {need} here, got dim={self.dim}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Tokens along (mel, time) for the longest input."""
        bands = self.n_mels if self.patch_mels is None else self.patch_mels
        return self.n_mels // bands, self.max_frames // self.patch_frames

    @property
    def hidden_dim(self) -> int:
        """F, the FFN width."""
        return max(1, int(self.mlp_ratio * self.dim))


class AudioEncoder(nn.Module):
    """A transformer over log-mel spectrograms: tokens -> [CLS] + positions -> blocks -> pooled.

    The token embedding is a Conv2d over the (J, M) spectrogram with kernel and stride
    (patch_mels, patch_frames): with the default patch of all bands x one frame, it is one
    Linear(J -> D) applied to every frame. Inputs should be standardised log-mel (for
    example with the training set's mean and standard deviation).

    Taught in notebooks/04_transformer_encoders.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        bands = c.n_mels if c.patch_mels is None else c.patch_mels
        self.patch_embed = nn.Conv2d(
            1, c.dim, kernel_size=(bands, c.patch_frames), stride=(bands, c.patch_frames)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))  # (1, 1, D)
        grid_f, grid_t = c.grid
        if c.position == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(grid_f, grid_t, c.dim))  # (f, t, D)
        else:
            if grid_f == 1:  # a token per frame (or per group of frames): 1-D over time
                table = sinusoidal_encoding(grid_t, c.dim)[None]  # (1, t, D)
            else:  # spectrogram patches: 2-D over (mel, time)
                table = sincos_2d_encoding(grid_f, grid_t, c.dim).reshape(grid_f, grid_t, c.dim)
            self.register_buffer("pos_embed", table.float(), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = _blocks(
            num_layers=c.num_layers,
            dim=c.dim,
            num_heads=c.num_heads,
            hidden_dim=c.hidden_dim,
            dropout=c.dropout,
            norm_first=c.norm_first,
            activation=c.activation,
            layer_norm_eps=c.layer_norm_eps,
        )
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes else None
        _init_patch_model(self)

    def _check_log_mel(self, log_mel: Tensor) -> None:
        c = self.config
        if log_mel.dim() != 3 or log_mel.shape[1] != c.n_mels:
            raise ValueError(
                f"expected log-mel of shape (B, n_mels={c.n_mels}, frames <= {c.max_frames}), "
                f"got {tuple(log_mel.shape)}"
            )
        frames = log_mel.shape[2]
        if frames > c.max_frames:
            raise ValueError(
                f"log-mel of {frames} frames is longer than max_frames={c.max_frames}; "
                "crop it or build the encoder with a larger max_frames"
            )
        if frames < c.patch_frames:
            raise ValueError(
                f"log-mel of {frames} frames is shorter than patch_frames={c.patch_frames}"
            )

    def forward(self, log_mel: Tensor, *, output_attentions: bool = False) -> EncoderOutput:
        """Encode a batch of log-mel spectrograms.

        Args:
            log_mel: (B, J, M) standardised log-mel, M <= ``max_frames``.
            output_attentions: also return every block's attention weights.

        Returns:
            :class:`EncoderOutput` with ``last_hidden_state`` (B, 1 + f t, D) where f x t is
            the token grid (f = 1 for frame tokens), token 0 being [CLS]; ``pooled`` (B, D);
            ``attentions``; ``logits`` if ``num_classes``.
        """
        self._check_log_mel(log_mel)
        x = self.patch_embed(log_mel.unsqueeze(1))  # (B, D, f, t)
        f, t = x.shape[2:]
        pos = self.pos_embed[:f, :t]  # (f, t, D): shorter inputs use the first t positions
        x = rearrange(x, "b d f t -> b (f t) d") + rearrange(pos, "f t d -> (f t) d")  # (B, N-1, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D), no position
        x = torch.cat([cls, x], dim=1)  # (B, N, D)
        x, attentions = _run_blocks(self.blocks, self.dropout(x), None, output_attentions)
        x = self.norm(x)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        logits = self.head(pooled) if self.head is not None else None
        return EncoderOutput(x, pooled, attentions, logits)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as fixed sin-cos positions are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "FeedForward",
    "TransformerBlock",
    "load_from_torch_layer",
    "EncoderOutput",
    "ViTConfig",
    "ViTEncoder",
    "TextEncoderConfig",
    "TextEncoder",
    "TextEmbeddings",
    "bert_weight_map",
    "load_from_bert",
    "AudioEncoderConfig",
    "AudioEncoder",
    "count_parameters",
]

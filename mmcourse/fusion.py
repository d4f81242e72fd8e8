"""Fusion strategies: how a model combines several modalities into one prediction.

Every strategy here has the same interface. Each modality m arrives as a sequence of N_m
tokens of width D (the output of its own small encoder, :class:`TokenEncoder`), and the
fusion module returns class logits::

    logits = fusion([X_1, X_2, ..., X_M])     # X_m: (B, N_m, D)  ->  (B, C)

A plain feature vector is a sequence of one token, (B, 1, D) (or just (B, D)). Each module
is built with ``num_tokens=(N_1, ..., N_M)``, so it works for any number of modalities:

- :class:`EarlyFusion` - concatenate, then one joint model: the pooled feature vectors
  ``[h_1; ...; h_M]`` into an MLP (``level="features"``), or the token sequences
  ``[X_1; ...; X_M]`` (with modality-type embeddings) into a self-attention block
  (``level="tokens"``, the multimodal input sequence of 002 §4.1);
- :class:`LateFusion` - one classifier head per modality, logits averaged
  (``weighting="average"``: the additive model of 000 §4.1, up to a factor 1/M) or
  combined with learned softmax weights (``weighting="learned"``);
- :class:`CrossAttentionFusion` - interactive fusion (002 §4.4): the tokens of each
  modality attend to the tokens of the others, O^{A<-B} = CrossAttention(X^A, X^B, X^B);
- :class:`GatedFusion` - a gated multimodal unit (Arevalo et al. 2017): a learned,
  per-sample and per-dimension convex combination of the modalities;
- :class:`FiLMFusion` - feature-wise linear modulation (Perez et al. 2018): the other
  modalities scale and shift the features of one target modality;
- :class:`TensorFusion` - tensor fusion (Zadeh et al. 2017): the outer product of the
  vectors [h_m; 1], which holds every unimodal, bimodal, ... M-modal product term.

:class:`FusionClassifier` puts per-modality encoders, one fusion strategy and modality
dropout together behind a typed :class:`FusionConfig`; :func:`train_classifier` and
:func:`accuracy` train and measure it.

Axis letters: B batch, M modalities, N tokens of one modality (N_m), S tokens of the other
modalities (keys), F raw features per input token, D width, H heads, C classes.

Taught in notebooks/05_fusion_strategies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmcourse import utils
from mmcourse.attention import MultiHeadAttention
from mmcourse.encoders import count_parameters  # the course's one parameter count, re-exported
from mmcourse.train import accuracy, predict  # the course's one evaluation helper, re-exported

logger = logging.getLogger(__name__)

FUSION_STRATEGIES = (
    "early",  # pooled features concatenated, then an MLP
    "early_tokens",  # token sequences concatenated, then a self-attention block
    "late_average",  # per-modality heads, logits averaged
    "late_learned",  # per-modality heads, logits weighted by learned softmax weights
    "cross_attention",  # each modality's tokens attend to the others'
    "gated",  # gated multimodal unit
    "film",  # the other modalities modulate one target modality
    "tensor",  # outer product of [h_m; 1]
)


# --- shared pieces ------------------------------------------------------------------------


def _as_tokens(inputs: Sequence[Tensor], num_tokens: Sequence[int], dim: int) -> list[Tensor]:
    """Check a list of per-modality inputs; (B, D) vectors become (B, 1, D) sequences."""
    if isinstance(inputs, Tensor) or not isinstance(inputs, Sequence):
        raise ValueError(
            f"expected a list of {len(num_tokens)} per-modality tensors (B, N_m, D), "
            f"got {type(inputs).__name__}"
        )
    if len(inputs) != len(num_tokens):
        raise ValueError(f"expected {len(num_tokens)} modalities, got {len(inputs)}")
    tokens = []
    for m, (x, n) in enumerate(zip(inputs, num_tokens, strict=True)):
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, D) -> (B, 1, D)
        if x.dim() != 3 or x.shape[1:] != (n, dim) or x.shape[0] != inputs[0].shape[0]:
            raise ValueError(
                f"modality {m}: expected tokens of shape (B, {n}, {dim}) with the batch size of "
                f"modality 0, got {tuple(x.shape)}"
            )
        tokens.append(x)
    return tokens


def _check_sizes(num_tokens: Sequence[int], **sizes: int) -> tuple[int, ...]:
    if isinstance(num_tokens, int) or len(num_tokens) == 0:
        raise ValueError(f"num_tokens must list N_m for each modality, got {num_tokens!r}")
    for m, n in enumerate(num_tokens):
        utils.positive_int(**{f"num_tokens[{m}]": n})
    utils.positive_int(**sizes)
    return tuple(int(n) for n in num_tokens)


class TokenPool(nn.Module):
    """(B, N, D) tokens -> (B, D_out) vector: flatten, then one linear layer and GELU.

    Unlike a mean over tokens, a linear map of the flattened sequence keeps *where* each
    feature was (which pixel block, which moment of the word): with tiny encoders and
    fixed-size inputs it is the better pooling (mean pooling needs deep, contextual
    tokens, as in chapter 04's transformer towers).

    Args:
        num_tokens: N, the sequence length it expects.
        dim: D, the token width.
        out_dim: D_out, the vector width (default D).
    """

    def __init__(self, *, num_tokens: int, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        utils.positive_int(num_tokens=num_tokens, dim=dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(num_tokens * dim, out_dim or dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.gelu(self.proj(self.norm(tokens).flatten(1)))  # (B, N*D) -> (B, D_out)


def _mlp_head(in_dim: int, hidden_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """in_dim -> hidden -> C, the joint classifier of the strategies that fuse before it."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_classes),
    )


# --- the strategies ---------------------------------------------------------------------


class EarlyFusion(nn.Module):
    """Concatenate the modalities first, then learn one joint model on the result.

    ``level="features"``: h_m = pool_m(X_m), z = [h_1; ...; h_M] (B, M*D) -> MLP -> logits.
    ``level="tokens"``: X = [X_1 + e_1; ...; X_M + e_M] (B, sum N_m, D), with e_m a learned
    modality-type embedding, -> one pre-norm transformer block (self-attention over all
    tokens of all modalities, then an MLP) -> pool -> MLP -> logits.

    Args:
        num_tokens: (N_1, ..., N_M), tokens per modality.
        dim: D, the token width.
        num_classes: C.
        hidden_dim: width of the joint MLP.
        level: ``"features"`` or ``"tokens"``.
        num_heads: H, heads of the self-attention (``level="tokens"``).
        dropout: dropout before and inside the classifier.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(
        self,
        *,
        num_tokens: Sequence[int],
        dim: int,
        num_classes: int,
        hidden_dim: int = 64,
        level: str = "features",
        num_heads: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = _check_sizes(num_tokens, dim=dim, num_classes=num_classes)
        utils.one_of("level", level, ("features", "tokens"))
        self.dim, self.level = dim, level
        M = len(self.num_tokens)
        if level == "features":
            self.pools = nn.ModuleList(TokenPool(num_tokens=n, dim=dim) for n in self.num_tokens)
            self.head = _mlp_head(M * dim, hidden_dim, num_classes, dropout)
        else:
            self.type_embed = nn.Parameter(torch.randn(M, dim) * 0.02)  # e_m, (M, D)
            self.norm1 = nn.LayerNorm(dim)
            self.attn = MultiHeadAttention(dim=dim, num_heads=num_heads)
            self.pool = TokenPool(num_tokens=sum(self.num_tokens), dim=dim)
            self.head = _mlp_head(dim, hidden_dim, num_classes, dropout)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, C) logits."""
        tokens = _as_tokens(inputs, self.num_tokens, self.dim)
        if self.level == "features":
            z = torch.cat([pool(x) for pool, x in zip(self.pools, tokens, strict=True)], -1)
            return self.head(z)  # (B, M*D) -> (B, C)
        x = torch.cat([x + self.type_embed[m] for m, x in enumerate(tokens)], 1)  # (B, sum N, D)
        h = self.norm1(x)
        # every token attends to every token of every modality
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.pool(x))


class LateFusion(nn.Module):
    """One classifier per modality; their logits are combined at the very end.

    l_m = head_m(pool_m(X_m)) (B, C), then
    ``weighting="average"``: l = (1/M) sum_m l_m, and
    ``weighting="learned"``: l = sum_m w_m l_m with w = softmax(a), a (M,) learned.
    With one modality it is a unimodal classifier (the baselines use it so).

    Args:
        num_tokens: (N_1, ..., N_M).
        dim: D.
        num_classes: C.
        weighting: ``"average"`` or ``"learned"``.
        dropout: dropout before each head.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(
        self,
        *,
        num_tokens: Sequence[int],
        dim: int,
        num_classes: int,
        weighting: str = "average",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = _check_sizes(num_tokens, dim=dim, num_classes=num_classes)
        utils.one_of("weighting", weighting, ("average", "learned"))
        self.dim, self.weighting = dim, weighting
        self.pools = nn.ModuleList(TokenPool(num_tokens=n, dim=dim) for n in self.num_tokens)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes)) for _ in self.num_tokens
        )
        # a: logits of the modality weights; zeros = equal weights at the start
        self.weight_logits = nn.Parameter(torch.zeros(len(self.num_tokens)))
        self.weight_logits.requires_grad_(weighting == "learned")

    def per_modality_logits(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, M, C): each modality's own prediction l_m."""
        tokens = _as_tokens(inputs, self.num_tokens, self.dim)
        return torch.stack(
            [head(pool(x)) for pool, head, x in zip(self.pools, self.heads, tokens, strict=True)],
            dim=1,
        )

    def modality_weights(self) -> Tensor:
        """(M,) the weights w_m (uniform 1/M for ``"average"``)."""
        if self.weighting == "average":
            return torch.full_like(self.weight_logits, 1.0 / len(self.num_tokens))
        return self.weight_logits.softmax(0)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, C) logits."""
        logits = self.per_modality_logits(inputs)  # (B, M, C)
        return torch.einsum("bmc,m->bc", logits, self.modality_weights())


class CrossAttentionFusion(nn.Module):
    """Interactive fusion: the tokens of each modality attend to those of the others.

    For each modality A, with X^B the tokens of all other modalities concatenated (S tokens):
    Y^A = X^A + CrossAttention(LN(X^A), LN(X^B), LN(X^B)), then Y^A = Y^A + MLP(LN(Y^A))
    (a pre-norm block, 002 §4.4 with our encoder tokens standing in for O^A); each
    direction has its own weights. The fused vectors pool_A(Y^A) are concatenated into an
    MLP classifier.

    Args:
        num_tokens: (N_1, ..., N_M), at least two modalities.
        dim: D.
        num_classes: C.
        num_heads: H.
        hidden_dim: width of the classifier MLP.
        dropout: dropout before and inside the classifier.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(
        self,
        *,
        num_tokens: Sequence[int],
        dim: int,
        num_classes: int,
        num_heads: int = 2,
        hidden_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = _check_sizes(num_tokens, dim=dim, num_classes=num_classes)
        M = len(self.num_tokens)
        if M < 2:
            raise ValueError(f"cross-attention fusion needs at least 2 modalities, got {M}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.norm_q = nn.ModuleList(nn.LayerNorm(dim) for _ in range(M))
        self.norm_kv = nn.ModuleList(nn.LayerNorm(dim) for _ in range(M))
        self.attn = nn.ModuleList(
            MultiHeadAttention(dim=dim, num_heads=num_heads) for _ in range(M)
        )
        self.pools = nn.ModuleList(TokenPool(num_tokens=n, dim=dim) for n in self.num_tokens)
        self.head = _mlp_head(M * dim, hidden_dim, num_classes, dropout)

    def _fuse(self, inputs: Sequence[Tensor], need_weights: bool) -> tuple[Tensor, list]:
        tokens = _as_tokens(inputs, self.num_tokens, self.dim)
        pooled, maps = [], []
        for m, x in enumerate(tokens):  # x: (B, N_m, D), the queries
            others = torch.cat([t for j, t in enumerate(tokens) if j != m], 1)  # (B, S, D)
            kv = self.norm_kv[m](others)
            out, weights = self.attn[m](self.norm_q[m](x), kv, kv, need_weights=need_weights)
            y = x + out  # (B, N_m, D): modality m, informed by the others
            pooled.append(self.pools[m](y))
            maps.append(weights)  # (B, H, N_m, S) or None
        return self.head(torch.cat(pooled, -1)), maps

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, C) logits."""
        return self._fuse(inputs, need_weights=False)[0]

    @torch.no_grad()
    def attention_maps(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Per modality m, its queries' weights over the other modalities' tokens.

        Returns:
            M tensors (B, H, N_m, S_m), S_m = the tokens of the other modalities in order.
        """
        return self._fuse(inputs, need_weights=True)[1]


class GatedFusion(nn.Module):
    """A gated multimodal unit: a learned, per-sample convex combination of the modalities.

    h_m = tanh(W_m pool_m(X_m)) (B, D); gate logits g = W_z [pool_1(X_1); ...] (B, M, D);
    z = softmax over m of g (for two modalities: z and 1 - z, a sigmoid gate);
    h = sum_m z_m * h_m, then an MLP classifier.

    Args:
        num_tokens: (N_1, ..., N_M).
        dim: D.
        num_classes: C.
        hidden_dim: width of the classifier MLP.
        dropout: dropout before and inside the classifier.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(
        self,
        *,
        num_tokens: Sequence[int],
        dim: int,
        num_classes: int,
        hidden_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = _check_sizes(num_tokens, dim=dim, num_classes=num_classes)
        M = len(self.num_tokens)
        self.dim = dim
        self.pools = nn.ModuleList(TokenPool(num_tokens=n, dim=dim) for n in self.num_tokens)
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(M))  # W_m
        self.gate = nn.Linear(M * dim, M * dim)  # W_z
        self.head = _mlp_head(dim, hidden_dim, num_classes, dropout)

    def _gated(self, inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        tokens = _as_tokens(inputs, self.num_tokens, self.dim)
        v = [pool(x) for pool, x in zip(self.pools, tokens, strict=True)]  # M x (B, D)
        h = torch.stack([torch.tanh(p(x)) for p, x in zip(self.proj, v, strict=True)], 1)
        g = rearrange(self.gate(torch.cat(v, -1)), "b (m d) -> b m d", m=len(v))  # (B, M, D)
        z = g.softmax(dim=1)  # (B, M, D): sums to 1 over the modalities
        return (z * h).sum(1), z  # (B, D), (B, M, D)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, C) logits."""
        return self.head(self._gated(inputs)[0])

    @torch.no_grad()
    def gates(self, inputs: Sequence[Tensor]) -> Tensor:
        """(B, M, D) the gates z: how much of each modality enters each fused dimension."""
        return self._gated(inputs)[1]


class FiLMFusion(nn.Module):
    """Feature-wise linear modulation: the other modalities scale and shift one modality.

    With t the target modality and c = [pool_j(X_j) for j != t] the conditioning vector,
    [delta_gamma; beta] = W c + b (each (B, D)), gamma = 1 + delta_gamma and
    FiLM(X_t) = gamma * X_t + beta on every token, then GELU, pool and an MLP classifier.
    Predicting delta_gamma rather than gamma is the FiLM paper's own choice (Perez et al.
    2018, model details): gamma starts near 1, so the modulation starts near the identity
    instead of scaling the features towards 0. The others reach the prediction *only*
    through gamma and beta.

    Args:
        num_tokens: (N_1, ..., N_M), at least two modalities.
        dim: D.
        num_classes: C.
        target: t, the index of the modulated modality.
        hidden_dim: width of the classifier MLP.
        dropout: dropout before and inside the classifier.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(
        self,
        *,
        num_tokens: Sequence[int],
        dim: int,
        num_classes: int,
        target: int = 0,
        hidden_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = _check_sizes(num_tokens, dim=dim, num_classes=num_classes)
        M = len(self.num_tokens)
        if M < 2:
            raise ValueError(f"FiLM fusion needs at least 2 modalities, got {M}")
        if not isinstance(target, int) or not 0 <= target < M:
            raise ValueError(f"target must be a modality index in 0..{M - 1}, got {target!r}")
        self.dim, self.target = dim, target
        self.cond_pools = nn.ModuleDict(
            {
                str(j): TokenPool(num_tokens=n, dim=dim)
                for j, n in enumerate(self.num_tokens)
                if j != target
            }
        )
        self.film = nn.Linear((M - 1) * dim, 2 * dim)  # c -> [delta_gamma; beta], near 0 at init
        self.pool = TokenPool(num_tokens=self.num_tokens[target], dim=dim)
        self.head = _mlp_head(dim, hidden_dim, num_classes, dropout)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, C) logits."""
        tokens = _as_tokens(inputs, self.num_tokens, self.dim)
        c = torch.cat([pool(tokens[int(j)]) for j, pool in self.cond_pools.items()], -1)
        delta_gamma, beta = self.film(c).chunk(2, dim=-1)  # (B, D) each
        gamma = 1 + delta_gamma  # the scale, near 1 at init
        x = tokens[self.target]  # (B, N_t, D)
        x = F.gelu(gamma[:, None] * x + beta[:, None])  # the same modulation on every token
        return self.head(self.pool(x))


def tensor_fusion(vectors: Sequence[Tensor]) -> Tensor:
    """The outer product of the vectors with a 1 appended: [h_1; 1] x [h_2; 1] x ...

    Args:
        vectors: M tensors (B, d_m).

    Returns:
        (B, prod_m (d_m + 1)), flattened in row-major (C) order of the indices (i_1, ..., i_M).
        It contains the 1 (the last entry), every h_m (unimodal terms), every pairwise
        product h_1[i] h_2[j] (bimodal terms), and so on up to the M-modal products.
    """
    if len(vectors) == 0 or any(v.dim() != 2 for v in vectors):
        raise ValueError(
            f"expected a non-empty list of (B, d_m) vectors, got shapes {[tuple(v.shape) for v in vectors]}"
        )
    z = None
    for v in vectors:
        v1 = F.pad(v, (0, 1), value=1.0)  # (B, d_m + 1): [h_m; 1]
        z = v1 if z is None else (z[:, :, None] * v1[:, None, :]).flatten(1)  # (B, prod)
    return z


class TensorFusion(nn.Module):
    """Tensor fusion: project each modality to d values, take the outer product of [h_m; 1].

    h_m = pool_m(X_m) (B, d), z = tensor_fusion([h_1, ..., h_M]) (B, (d + 1)^M), then an
    MLP classifier. The size grows as (d + 1)^M: keep d small.

    Args:
        num_tokens: (N_1, ..., N_M).
        dim: D.
        num_classes: C.
        tensor_dim: d, the width of each modality before the product.
        hidden_dim: width of the classifier MLP.
        dropout: dropout before and inside the classifier.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(
        self,
        *,
        num_tokens: Sequence[int],
        dim: int,
        num_classes: int,
        tensor_dim: int = 16,
        hidden_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tokens = _check_sizes(
            num_tokens, dim=dim, num_classes=num_classes, tensor_dim=tensor_dim
        )
        self.dim = dim
        size = (tensor_dim + 1) ** len(self.num_tokens)
        if size > 2**20:
            raise ValueError(
                f"tensor fusion of {len(self.num_tokens)} modalities with tensor_dim={tensor_dim} "
                f"has {size} features; use a smaller tensor_dim"
            )
        self.pools = nn.ModuleList(
            TokenPool(num_tokens=n, dim=dim, out_dim=tensor_dim) for n in self.num_tokens
        )
        self.head = _mlp_head(size, hidden_dim, num_classes, dropout)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """[(B, N_m, D)] * M -> (B, C) logits."""
        tokens = _as_tokens(inputs, self.num_tokens, self.dim)
        h = [pool(x) for pool, x in zip(self.pools, tokens, strict=True)]  # M x (B, d)
        return self.head(tensor_fusion(h))


# --- encoders and the whole classifier ---------------------------------------------------


class TokenEncoder(nn.Module):
    """A tiny per-modality encoder: raw tokens (B, N, F) -> tokens (B, N, D).

    x_i = GELU(W f_i + b + p_i): a linear embedding of each raw token f_i plus a learned
    position embedding p_i, then a nonlinearity. Images arrive as patches
    (:func:`mmcourse.modalities.patchify`), log-mel spectrograms as frames. Deliberately
    shallow: the fusion strategies are what we compare, and each adds its own layers.

    Args:
        num_tokens: N.
        token_dim: F, raw features per token.
        dim: D.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(self, *, num_tokens: int, token_dim: int, dim: int) -> None:
        super().__init__()
        utils.positive_int(num_tokens=num_tokens, token_dim=token_dim, dim=dim)
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.embed = nn.Linear(token_dim, dim)  # W, b
        self.position = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)  # p_i, (N, D)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"expected raw tokens of shape (B, {self.num_tokens}, {self.token_dim}), "
                f"got {tuple(x.shape)}"
            )
        return F.gelu(self.embed(x) + self.position)  # (B, N, D)


@dataclass
class FusionConfig:
    """A classifier over M modalities: encoders, one fusion strategy, modality dropout.

    Taught in notebooks/05_fusion_strategies.
    """

    strategy: str = "late_average"  # one of FUSION_STRATEGIES, or "<modality>_only"
    modalities: tuple[str, ...] = ("image", "audio")  # names of the M modalities, in order
    num_tokens: tuple[int, ...] = (16, 26)  # N_m: tokens per modality (4x4 patches, frames)
    token_dims: tuple[int, ...] = (4, 20)  # F_m: raw features per token (2x2 pixels, mels)
    num_classes: int = 10  # C
    dim: int = 32  # D: token width after each encoder
    hidden_dim: int = 64  # width of the fused classifier MLPs
    num_heads: int = 2  # H: heads of cross-attention and of early_tokens' self-attention
    tensor_dim: int = 16  # d: per-modality width before the tensor product, (d+1)^M features
    film_target: int = 0  # index of the modality that FiLM modulates
    dropout: float = 0.1  # ordinary dropout in encoders and classifiers
    modality_dropout: float = 0.0  # p: in training, drop each modality with probability p

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.num_tokens = tuple(self.num_tokens)
        self.token_dims = tuple(self.token_dims)
        M = len(self.modalities)
        if M == 0 or len(set(self.modalities)) != M:
            raise ValueError(f"modalities must be distinct names, got {self.modalities!r}")
        if len(self.num_tokens) != M or len(self.token_dims) != M:
            raise ValueError(
                f"num_tokens and token_dims need one entry per modality ({M}), got "
                f"{self.num_tokens!r} and {self.token_dims!r}"
            )
        utils.one_of("strategy", self.strategy, self.strategies())
        utils.positive_int(num_classes=self.num_classes, dim=self.dim, hidden_dim=self.hidden_dim)
        utils.positive_int(num_heads=self.num_heads, tensor_dim=self.tensor_dim)
        utils.fraction(dropout=self.dropout, modality_dropout=self.modality_dropout)
        if self.modality_dropout >= 1:
            raise ValueError(f"modality_dropout must be < 1, got {self.modality_dropout}")

    def strategies(self) -> tuple[str, ...]:
        """The valid strategy names for these modalities."""
        return tuple(f"{name}_only" for name in self.modalities) + FUSION_STRATEGIES

    @property
    def used(self) -> tuple[int, ...]:
        """Indices of the modalities the strategy reads (one for a ``*_only`` baseline)."""
        if self.strategy.endswith("_only"):
            return (self.modalities.index(self.strategy.removesuffix("_only")),)
        return tuple(range(len(self.modalities)))


def build_fusion(config: FusionConfig) -> nn.Module:
    """The fusion module of ``config.strategy`` over the modalities it uses."""
    num_tokens = tuple(config.num_tokens[m] for m in config.used)
    common = dict(num_tokens=num_tokens, dim=config.dim, num_classes=config.num_classes)
    s, hidden, drop = config.strategy, config.hidden_dim, config.dropout
    if s.endswith("_only") or s == "late_average":
        return LateFusion(**common, weighting="average", dropout=drop)
    if s == "late_learned":
        return LateFusion(**common, weighting="learned", dropout=drop)
    if s == "early":
        return EarlyFusion(**common, level="features", hidden_dim=hidden, dropout=drop)
    if s == "early_tokens":
        return EarlyFusion(
            **common, level="tokens", hidden_dim=hidden, num_heads=config.num_heads, dropout=drop
        )
    if s == "cross_attention":
        return CrossAttentionFusion(
            **common, num_heads=config.num_heads, hidden_dim=hidden, dropout=drop
        )
    if s == "gated":
        return GatedFusion(**common, hidden_dim=hidden, dropout=drop)
    if s == "film":
        return FiLMFusion(**common, target=config.film_target, hidden_dim=hidden, dropout=drop)
    if s == "tensor":
        return TensorFusion(**common, tensor_dim=config.tensor_dim, hidden_dim=hidden, dropout=drop)
    raise ValueError(f"unknown strategy {s!r}")  # pragma: no cover - FusionConfig checks it


def modality_dropout_mask(
    batch_size: int, num_modalities: int, p: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """(B, M) bool, True = present: each modality dropped with probability p, never all.

    A row where every modality was dropped keeps one, chosen uniformly.
    """
    utils.positive_int(batch_size=batch_size, num_modalities=num_modalities)
    utils.fraction(p=p)
    present = torch.rand(batch_size, num_modalities, generator=generator) >= p  # (B, M)
    empty = ~present.any(1)  # (B,)
    keep = torch.randint(0, num_modalities, (batch_size,), generator=generator)  # (B,)
    present[empty, keep[empty]] = True
    return present


class FusionClassifier(nn.Module):
    """Per-modality encoders, one fusion strategy and a classifier, behind one config.

    ``forward(inputs, present=None)`` takes the M raw token tensors (B, N_m, F_m) in the
    order of ``config.modalities`` and returns (B, C) logits. A **missing** modality is its
    input replaced by zeros - after standardisation with training statistics that is the
    training mean - for every strategy alike: ``present`` (B, M) or (M,) bool marks what
    is there. In training mode, **modality dropout** additionally drops each modality of
    each sample with probability ``config.modality_dropout`` (never all of them).

    Args:
        config: the modalities, their token shapes, the strategy and the sizes.

    Taught in notebooks/05_fusion_strategies.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict(
            {
                config.modalities[m]: TokenEncoder(
                    num_tokens=config.num_tokens[m],
                    token_dim=config.token_dims[m],
                    dim=config.dim,
                )
                for m in config.used
            }
        )
        self.fusion = build_fusion(config)

    def forward(
        self, inputs: Sequence[Tensor], present: Tensor | Sequence[bool] | None = None
    ) -> Tensor:
        """[(B, N_m, F_m)] * M raw tokens (all M modalities) -> (B, C) logits.

        Args:
            inputs: the raw tokens of every modality in ``config.modalities``, standardised.
            present: None (all present), (M,) bool for the whole batch or (B, M) bool per
                example; a False modality reads zeros (whatever its input holds, NaN too).
                Every example needs at least one of the modalities the model reads.
        """
        return self.fusion(self.encode(inputs, present))

    def encode(
        self, inputs: Sequence[Tensor], present: Tensor | Sequence[bool] | None = None
    ) -> list[Tensor]:
        """The encoded tokens [(B, N_m, D)] of the modalities the strategy uses."""
        cfg = self.config
        M = len(cfg.modalities)
        if isinstance(inputs, Tensor) or len(inputs) != M:
            raise ValueError(
                f"expected a list of {M} tensors, one per modality {cfg.modalities}, got "
                f"{len(inputs) if not isinstance(inputs, Tensor) else 'one tensor'}"
            )
        B = inputs[0].shape[0]
        device = inputs[0].device
        mask = torch.ones(B, M, dtype=torch.bool, device=device)
        if present is not None:
            present = torch.as_tensor(present, dtype=torch.bool, device=device)
            if present.shape not in ((M,), (B, M)):
                raise ValueError(
                    f"present must have shape ({M},) or ({B}, {M}), got {tuple(present.shape)}"
                )
            mask = mask & present
            used = list(cfg.used)
            none = (~mask[:, used].any(1)).nonzero().flatten().tolist()  # examples with nothing
            if none:
                names = [cfg.modalities[m] for m in used]
                raise ValueError(
                    f"example(s) {none[:10]} have no modality present among {names}, the "
                    "modalities this model reads: a prediction needs at least one"
                )
        if self.training and cfg.modality_dropout > 0 and len(cfg.used) > 1:
            mask = mask & modality_dropout_mask(B, M, cfg.modality_dropout).to(device)
        tokens = []
        for m in cfg.used:
            # a missing modality reads zeros: replaced (a NaN times 0 would still be NaN)
            x = torch.where(mask[:, m, None, None], inputs[m], torch.zeros_like(inputs[m]))
            tokens.append(self.encoders[cfg.modalities[m]](x))
        return tokens


# --- data and training --------------------------------------------------------------------


def classification_loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """Cross-entropy of ``model`` on one batch ``(*inputs, labels)``: the loss ``train.fit`` takes.

    Args:
        model: a module taking a list of per-modality tensors (B, ...) and returning (B, C).
        batch: the M input tensors then the (B,) int64 labels, as
            ``train.ShuffledBatches(*inputs, labels, ...)`` yields them.

    Returns:
        The mean cross-entropy, a scalar.

    Taught in notebooks/05_fusion_strategies.
    """
    *inputs, labels = batch
    return F.cross_entropy(model(list(inputs)), labels)


__all__ = [
    "FUSION_STRATEGIES",
    "TokenPool",
    "EarlyFusion",
    "LateFusion",
    "CrossAttentionFusion",
    "GatedFusion",
    "FiLMFusion",
    "TensorFusion",
    "tensor_fusion",
    "TokenEncoder",
    "FusionConfig",
    "FusionClassifier",
    "build_fusion",
    "modality_dropout_mask",
    "count_parameters",
    "classification_loss",
    "predict",
    "accuracy",
]

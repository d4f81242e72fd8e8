"""Attention: scaled dot-product attention, its masks, and multi-head attention.

The textbook formula (Vaswani et al., 2017; the source's 002 §4.2) for queries Q (L, E), keys
K (S, E) and values V (S, Ev):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V,        d_k = E,

and multi-head attention, each head i with its own projections W^Q_i, W^K_i, W^V_i:

    head_i = Attention(X W^Q_i, X W^K_i, X W^V_i),   MultiHead(X) = Concat(head_1..head_h) W^O.

Two paths compute the same numbers (tested in value and gradient):

* the **reference path**, :func:`scaled_dot_product_attention`, the formula written out;
  it also returns the attention weights;
* the **fused path**, :func:`fused_attention`, which calls
  ``torch.nn.functional.scaled_dot_product_attention`` (a fused kernel: on a CPU a
  flash-attention-style loop that never stores the (L, S) matrix; on a GPU flash or
  memory-efficient kernels). It returns no weights.

Mask conventions (the same as ``torch.nn.functional.scaled_dot_product_attention``):

* a **boolean** ``attn_mask``: ``True`` = *may attend*, ``False`` = masked out;
* a **float** ``attn_mask``: added to the scaled scores (``0`` keeps, ``-inf`` masks);
* either one broadcasts to the scores' shape (..., L, S).

``MultiHeadAttention.forward``'s ``key_padding_mask`` follows ``nn.MultiheadAttention``
instead: ``True`` = *padding, ignore this key*. The helpers :func:`padding_mask`,
:func:`causal_mask` and :func:`modality_block_mask` all return ``True`` = may attend.

A query row whose keys are *all* masked has nothing to average. Both paths here return a
zero output row and zero weights for it (never NaN), with zero gradients. PyTorch is not
consistent here: in torch 2.13 on a CPU, ``F.scaled_dot_product_attention`` returns zeros
for such a row, but ``nn.MultiheadAttention`` with ``need_weights=True`` returns NaN, and
fused GPU kernels have returned NaN in some versions (pytorch/pytorch#103749, #109517).
So the fused path here enforces the zeros itself rather than rely on the kernel, and the
tests compare with torch only on rows that are not fully masked.

Axis letters: B batch, H heads, L query length, S key/value length, E query/key width
(per head, d_k), Ev value width (per head), D model width (D = H * Dh), Dh head width.

Taught in notebooks/02_attention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmcourse.utils import positive_int

__all__ = [
    "scaled_dot_product_attention",
    "fused_attention",
    "MultiHeadAttention",
    "padding_mask",
    "causal_mask",
    "modality_block_mask",
]


# --- input checks -------------------------------------------------------------------------


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise ValueError unless q (..., L, E), k (..., S, E), v (..., S, Ev) fit together."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"expected {name} of shape (..., N, E), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"expected a floating-point {name}, got dtype {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "query and key must have the same width E (d_k) to be compared by a dot product, "
            f"got query {tuple(q.shape)} and key {tuple(k.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            "key and value must have the same length S (one value per key), "
            f"got key {tuple(k.shape)} and value {tuple(v.shape)}"
        )
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ValueError(
            "query, key and value must have the same leading (batch, head) dimensions, "
            f"got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )


def _check_mask(
    mask: Tensor, scores_shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ValueError unless ``mask`` is a bool or float mask broadcastable to the scores."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device} but the query on {device}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise ValueError(
                "attn_mask must be boolean (True = may attend) or floating point (added to the "
                f"scores), got dtype {mask.dtype}; a 0/1 integer mask such as a tokenizer's "
                "attention_mask becomes a boolean one with mask.bool()"
            )
        if mask.dtype != dtype:
            raise ValueError(
                f"a float attn_mask must have the query's dtype {dtype}, got {mask.dtype}"
            )
    try:
        shape = torch.broadcast_shapes(mask.shape, tuple(scores_shape))
    except RuntimeError:
        shape = None
    if shape != tuple(scores_shape):
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention scores "
            f"(..., L, S) = {tuple(scores_shape)}"
        )


def _check_common(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None = None,
) -> None:
    _check_qkv(q, k, v)
    if attn_mask is not None:
        if is_causal:
            raise ValueError(
                "give attn_mask or is_causal=True, not both (as in F.scaled_dot_product_attention); "
                "to combine them pass attn_mask & causal_mask(L, S)"
            )
        _check_mask(attn_mask, (*q.shape[:-1], k.shape[-2]), q.dtype, q.device)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if k.shape[-2] == 0:
        raise ValueError(f"no keys to attend to: key has length S = 0, shape {tuple(k.shape)}")
    if scale is not None and (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(
            f"scale must be a finite number > 0 (or None for 1/sqrt(E)), got {scale!r}"
        )


def _fully_masked_rows(attn_mask: Tensor) -> Tensor:
    """(..., L, 1) True where a query row of ``attn_mask`` lets it attend to no key at all."""
    if attn_mask.dtype == torch.bool:
        return ~attn_mask.any(dim=-1, keepdim=True)
    return torch.isneginf(attn_mask).all(dim=-1, keepdim=True)


# --- the two paths -----------------------------------------------------------------------


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference path: ``softmax(q k^T * scale + mask) v``, written out, with its weights.

    Same arguments and mask semantics as ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: queries (..., L, E).
        k: keys (..., S, E).
        v: values (..., S, Ev).
        attn_mask: None, a boolean mask (True = may attend) or a float mask added to the
            scaled scores; broadcastable to (..., L, S).
        is_causal: mask out the future: query i attends to keys j <= i (top-left aligned,
            as ``torch``'s ``is_causal``; see :func:`causal_mask`). Not with ``attn_mask``.
        dropout_p: probability of zeroing an attention weight (the survivors are scaled by
            ``1 / (1 - dropout_p)``). Applied whenever > 0, as in torch: a module passes 0
            in eval mode.
        scale: the factor on the scores; ``1 / sqrt(E)`` if None.

    Returns:
        ``(output, weights)``: output (..., L, Ev) and the attention weights (..., L, S)
        actually applied to ``v`` (after dropout, as ``nn.MultiheadAttention`` and
        ``transformers`` return them), so ``output == weights @ v``. Each row of the
        weights sums to 1 (without dropout), except a **fully masked** row: there the
        weights and the output are zeros, not NaN, and no gradient flows through it.

    The softmax is computed in float32 for half-precision inputs, then cast back.

    Taught in notebooks/02_attention.
    """
    _check_common(q, k, v, attn_mask, is_causal, dropout_p, scale)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # 1) similarities of every query with every key, scaled
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    # 2) masks: a boolean mask removes entries, a float mask is added
    if is_causal:
        attn_mask = causal_mask(L, S, device=q.device)  # (L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # 3) softmax over the keys; a row with every score -inf gets weights 0 instead of NaN
    fully_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., L, 1)
    scores = scores.masked_fill(fully_masked, 0.0)
    low_precision = q.dtype in (torch.float16, torch.bfloat16)
    softmax_dtype = torch.float32 if low_precision else q.dtype
    weights = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)  # (..., L, S)
    weights = weights.masked_fill(fully_masked, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    # 4) weighted average of the values
    return weights @ v, weights  # (..., L, Ev), (..., L, S)


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """The fast path: ``F.scaled_dot_product_attention`` with the reference path's semantics.

    Arguments as :func:`scaled_dot_product_attention`. The only addition to the torch call
    is the explicit handling of fully masked query rows (zeros, not NaN, whatever the
    kernel does): those rows are unmasked for the kernel and their outputs zeroed after.
    This costs one pass over the mask when a mask is given, nothing otherwise.

    Returns:
        output (..., L, Ev); no weights (the kernel never forms them).

    Taught in notebooks/02_attention.
    """
    _check_common(q, k, v, attn_mask, is_causal, dropout_p, scale)
    if attn_mask is None:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )  # (..., L, Ev)
    fully_masked = _fully_masked_rows(attn_mask)  # (..., L, 1)
    if attn_mask.dtype == torch.bool:
        attn_mask = attn_mask | fully_masked
    else:
        attn_mask = attn_mask.masked_fill(fully_masked, 0.0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )  # (..., L, Ev)
    return out.masked_fill(fully_masked, 0.0)


# --- masks (True = may attend) -------------------------------------------------------------


def padding_mask(
    lengths: Tensor | Sequence[int], max_len: int | None = None, *, device=None
) -> Tensor:
    """Which positions of a padded batch hold real tokens.

    Args:
        lengths: (B,) the number of real tokens of each sequence (they come first).
        max_len: S, the padded length; ``max(lengths)`` if None.
        device: where to build the mask; the device of ``lengths`` (or cpu) if None.

    Returns:
        (B, S) bool, ``True`` = a real token (*may be attended to*), ``False`` = padding.
        As an ``attn_mask`` for keys use ``mask[:, None, None, :]`` (broadcasts to
        (B, H, L, S)); as ``MultiHeadAttention``'s ``key_padding_mask`` (True = padding)
        pass ``~mask``.

    Taught in notebooks/02_attention.
    """
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D sequence of integers (B,), got {tuple(lengths.shape)} "
            f"of dtype {lengths.dtype}"
        )
    if len(lengths) and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    longest = int(lengths.max()) if len(lengths) else 0
    if max_len is None:
        max_len = longest
    else:
        positive_int(max_len=max_len)
        if longest > max_len:
            raise ValueError(f"a length {longest} exceeds max_len={max_len}")
    positions = torch.arange(max_len, device=lengths.device)  # (S,)
    return positions[None, :] < lengths[:, None]  # (B, S)


def causal_mask(L: int, S: int | None = None, *, device=None) -> Tensor:
    """Each query may attend to itself and the keys before it: ``mask[i, j] = j <= i``.

    Args:
        L: number of queries.
        S: number of keys; ``L`` if None.
        device: where to build the mask.

    Returns:
        (L, S) bool, lower triangular, ``True`` = may attend. Aligned at the top-left
        corner like ``F.scaled_dot_product_attention(..., is_causal=True)``: with S > L,
        query i still sees keys 0..i only. (A decoder with a cache of S - L earlier keys
        wants the bottom-right alignment, ``j <= i + S - L``.)

    Taught in notebooks/02_attention.
    """
    positive_int(L=L)
    S = L if S is None else S
    positive_int(S=S)
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()  # (L, S)


def _allowed_matrix(allowed: Tensor | Iterable[tuple[int, int]], num_modalities: int) -> Tensor:
    """The (M, M) bool matrix ``allowed[a, b]``: queries of modality a may attend to keys of b."""
    if isinstance(allowed, Tensor):
        if (
            allowed.dtype != torch.bool
            or allowed.dim() != 2
            or allowed.shape[0] != allowed.shape[1]
        ):
            raise ValueError(
                "allowed as a tensor must be an (M, M) boolean matrix, got "
                f"{tuple(allowed.shape)} of dtype {allowed.dtype}"
            )
        return allowed
    try:
        pairs = [(int(a), int(b)) for a, b in allowed]
    except (TypeError, ValueError) as err:
        raise ValueError(
            "allowed must be an iterable of (query_modality, key_modality) pairs, e.g. "
            f"[(0, 0), (1, 0), (1, 1)], or an (M, M) boolean tensor; got {allowed!r}"
        ) from err
    if any(a < 0 or b < 0 for a, b in pairs):
        raise ValueError(f"allowed pairs must hold modality indices >= 0, got {pairs}")
    size = max([num_modalities, *(max(a, b) + 1 for a, b in pairs)])
    matrix = torch.zeros(size, size, dtype=torch.bool)
    for a, b in pairs:
        matrix[a, b] = True
    return matrix


def modality_block_mask(
    *,
    lengths: Sequence[int] | None = None,
    segment_ids: Tensor | None = None,
    allowed: Iterable[tuple[int, int]] | Tensor,
    causal: Iterable[int] = (),
    device=None,
) -> Tensor:
    """A block mask for a sequence that mixes modalities, e.g. image patches then text.

    Give the layout either as ``lengths`` (modality m has ``lengths[m]`` consecutive
    tokens, in order) or as ``segment_ids`` (the modality index of every token).

    Args:
        lengths: the number of tokens of each modality, e.g. ``[16, 5]``: 16 image patches,
            then 5 text tokens.
        segment_ids: (N,) or (B, N) integer modality index of each token.
        allowed: which blocks are open, as ``(query_modality, key_modality)`` pairs, e.g.
            ``[(0, 0), (1, 0), (1, 1)]``: image attends to image, text to image and text,
            image not to text. An (M, M) boolean tensor ``allowed[a, b]`` works too.
        causal: modalities whose own block is causal (token i of the block sees tokens j <= i
            of it), e.g. ``causal=[1]`` for text generated left to right.
        device: where to build the mask.

    Returns:
        (N, N) bool, or (B, N, N) for (B, N) ``segment_ids``; ``True`` = may attend. A
        query whose modality may attend to nothing gets a fully masked row (its attention
        output is then zero; see the module docstring).

    Taught in notebooks/02_attention.
    """
    if (lengths is None) == (segment_ids is None):
        raise ValueError("give exactly one of lengths= or segment_ids=")
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        if not lengths or any(n <= 0 for n in lengths):
            raise ValueError(f"lengths must be positive token counts per modality, got {lengths}")
        ids = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
        )  # (N,)
        num_modalities = len(lengths)
    else:
        ids = torch.as_tensor(segment_ids, device=device)
        if ids.dim() not in (1, 2) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                "segment_ids must be integers of shape (N,) or (B, N), got "
                f"{tuple(ids.shape)} of dtype {ids.dtype}"
            )
        if ids.numel() and ids.min() < 0:
            raise ValueError(f"segment_ids must be >= 0, got minimum {int(ids.min())}")
        num_modalities = int(ids.max()) + 1 if ids.numel() else 0
    matrix = _allowed_matrix(allowed, num_modalities).to(ids.device)  # (M, M)
    if num_modalities > matrix.shape[0]:
        raise ValueError(
            f"allowed covers {matrix.shape[0]} modalities but the sequence has {num_modalities}"
        )
    mask = matrix[ids[..., :, None], ids[..., None, :]]  # (..., N, N)
    N = ids.shape[-1]
    later = ~torch.ones(N, N, dtype=torch.bool, device=ids.device).tril()  # (N, N): j > i
    for m in causal:
        in_m = ids == int(m)  # (..., N)
        mask = mask & ~(in_m[..., :, None] & in_m[..., None, :] & later)
    return mask


# --- multi-head attention ------------------------------------------------------------------


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean (True = may attend) mask as a float one: 0 where allowed, -inf elsewhere."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf")
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention: h heads, each with its own W^Q_i, W^K_i, W^V_i, concatenated.

    The h per-head projections (D -> Dh each) are stored side by side as one ``nn.Linear``
    per role (``q_proj`` holds W^Q_1..W^Q_h), split into heads with ``einops.rearrange``.
    Same parameters and numbers as ``nn.MultiheadAttention(batch_first=True)`` (see
    :meth:`from_torch`), with the mask conventions of ``F.scaled_dot_product_attention``.

    Args:
        dim: D, the model width (queries and outputs).
        num_heads: h; must divide ``dim``. Each head has width Dh = D / h.
        dropout: dropout probability on the attention weights, in training mode only.
        bias: add biases to the four projections.
        use_sdpa: compute with the fused kernel (:func:`fused_attention`) when no weights
            are asked for; ``False`` always uses the reference path.
        kdim: width of the keys' source (for cross-attention); ``dim`` if None.
        vdim: width of the values' source; ``dim`` if None.
        rotary: a module ``(q, k) -> (q, k)`` on the split heads (B, H, L, Dh), (B, H, S, Dh),
            applied before the scores: the hook for rotary embeddings
            (:class:`mmcourse.positional.Rotary`); None for none.

    Taught in notebooks/02_attention (the hook: 03_positional_encoding).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        use_sdpa: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        rotary: nn.Module | None = None,
    ) -> None:
        super().__init__()
        positive_int(dim=dim, num_heads=num_heads)
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        kdim = dim if kdim is None else kdim
        vdim = dim if vdim is None else vdim
        positive_int(kdim=kdim, vdim=vdim)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.dropout = float(dropout)
        self.use_sdpa = bool(use_sdpa)
        self.q_proj = nn.Linear(dim, dim, bias=bias)  # W^Q_1..W^Q_h side by side
        self.k_proj = nn.Linear(kdim, dim, bias=bias)  # W^K_1..W^K_h
        self.v_proj = nn.Linear(vdim, dim, bias=bias)  # W^V_1..W^V_h
        self.out_proj = nn.Linear(dim, dim, bias=bias)  # W^O
        self.rotary = rotary
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Xavier-uniform projections and zero biases, as ``nn.MultiheadAttention``."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @classmethod
    def from_torch(
        cls, module: nn.MultiheadAttention, *, use_sdpa: bool = True
    ) -> MultiHeadAttention:
        """A copy of a ``nn.MultiheadAttention`` (same weights, same numbers).

        Raises:
            ValueError: the module uses ``add_bias_kv`` or ``add_zero_attn`` (not supported).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise ValueError(f"expected an nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        D = module.embed_dim
        ours = cls(
            dim=D,
            num_heads=module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            use_sdpa=use_sdpa,
            kdim=module.kdim,
            vdim=module.vdim,
        )
        ours = ours.to(device=module.out_proj.weight.device, dtype=module.out_proj.weight.dtype)
        with torch.no_grad():
            if module.in_proj_weight is not None:  # packed (3D, D): rows are W^Q; W^K; W^V
                w_q, w_k, w_v = module.in_proj_weight.chunk(3)
            else:
                w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
            ours.q_proj.weight.copy_(w_q)
            ours.k_proj.weight.copy_(w_k)
            ours.v_proj.weight.copy_(w_v)
            ours.out_proj.weight.copy_(module.out_proj.weight)
            if module.in_proj_bias is not None:
                b_q, b_k, b_v = module.in_proj_bias.chunk(3)
                ours.q_proj.bias.copy_(b_q)
                ours.k_proj.bias.copy_(b_k)
                ours.v_proj.bias.copy_(b_v)
                ours.out_proj.bias.copy_(module.out_proj.bias)
        return ours

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t, width in (
            ("query", query, self.dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"expected {name} of shape (B, N, {width}) (batch first), got {shape}"
                )
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(
                "query, key and value must have the same batch size B, got "
                f"{query.shape[0]}, {key.shape[0]} and {value.shape[0]}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value must have the same length S, got {key.shape[1]} and "
                f"{value.shape[1]}"
            )

    def _merge_masks(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        *,
        B: int,
        L: int,
        S: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        """One mask broadcastable to (B, H, L, S), boolean if every part is, else additive."""
        parts = []
        if key_padding_mask is not None:
            kpm = key_padding_mask
            if not isinstance(kpm, Tensor) or tuple(kpm.shape) != (B, S):
                shape = tuple(kpm.shape) if isinstance(kpm, Tensor) else type(kpm).__name__
                raise ValueError(
                    f"expected key_padding_mask of shape (B, S) = {(B, S)} (True = padding), "
                    f"got {shape}"
                )
            if kpm.device != device:
                raise ValueError(f"key_padding_mask is on {kpm.device} but the query on {device}")
            if kpm.dtype == torch.bool:
                kpm = ~kpm  # True = padding  ->  True = may attend
            elif not kpm.is_floating_point():
                raise ValueError(
                    "key_padding_mask must be boolean (True = padding, ignore this key) or float "
                    f"(added to the scores), got dtype {kpm.dtype}"
                )
            parts.append(kpm[:, None, None, :])  # (B, 1, 1, S)
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor) or attn_mask.dim() not in (2, 3, 4):
                shape = tuple(attn_mask.shape) if isinstance(attn_mask, Tensor) else type(attn_mask)
                raise ValueError(
                    f"expected attn_mask of shape (L, S), (B, L, S) or (B, H, L, S), got {shape}"
                )
            if (
                attn_mask.dim() == 3
                and self.num_heads > 1
                and attn_mask.shape[0] == B * self.num_heads
            ):
                raise ValueError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} looks like nn.MultiheadAttention's "
                    "(B*H, L, S) layout; here a 3-D mask is (B, L, S): pass "
                    "attn_mask.view(B, H, L, S) instead"
                )
            mask = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask  # (B, 1, L, S)
            _check_mask(mask, (B, self.num_heads, L, S), mask.dtype, device)
            parts.append(mask)
        if is_causal:
            parts.append(causal_mask(L, S, device=device))  # (L, S)
        if not parts:
            return None
        if all(p.dtype == torch.bool for p in parts):
            merged = parts[0]
            for p in parts[1:]:
                merged = merged & p
            return merged
        merged = _as_additive(parts[0], dtype)
        for p in parts[1:]:
            merged = merged + _as_additive(p, dtype)
        return merged

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value`` (batch first).

        Args:
            query: (B, L, D).
            key: (B, S, kdim); None = self-attention (``key = value = query``).
            value: (B, S, vdim); None = ``key``.
            key_padding_mask: (B, S), **True = padding: ignore this key** (the convention of
                ``nn.MultiheadAttention`` and the *opposite* of a boolean ``attn_mask``);
                a float mask is added to the scores.
            attn_mask: True = may attend (the ``F.scaled_dot_product_attention`` convention,
                the opposite of ``nn.MultiheadAttention``'s boolean ``attn_mask``), or float,
                added. Shape (L, S) for every sequence and head, (B, L, S) per sequence, or
                (B, H, L, S) (any axis may be 1).
            is_causal: also apply :func:`causal_mask` (L, S). Unlike ``nn.MultiheadAttention``,
                where it is only a hint about ``attn_mask``, here it builds the mask and
                combines it with the others.
            need_weights: return the attention weights. They come from the reference path,
                the same computation as the output (so with dropout they are the weights
                actually applied): asking for them means not using the fused kernel, as in
                ``nn.MultiheadAttention`` and ``transformers``. Pass False for speed.

        Returns:
            ``(output, weights)``: output (B, L, D); weights (B, H, L, S) **per head**
            (``nn.MultiheadAttention`` averages them over heads by default:
            ``weights.mean(1)``), or None when ``need_weights`` is False.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        B, L, _ = query.shape
        S = key.shape[1]
        mask = self._merge_masks(
            key_padding_mask,
            attn_mask,
            is_causal,
            B=B,
            L=L,
            S=S,
            dtype=query.dtype,
            device=query.device,
        )  # None or broadcastable to (B, H, L, S)
        # 1) project; 2) split D into h heads of width Dh: head i uses W^Q_i, W^K_i, W^V_i
        h = self.num_heads
        q = rearrange(self.q_proj(query), "b l (h d) -> b h l d", h=h)  # (B, H, L, Dh)
        k = rearrange(self.k_proj(key), "b s (h d) -> b h s d", h=h)  # (B, H, S, Dh)
        v = rearrange(self.v_proj(value), "b s (h d) -> b h s d", h=h)  # (B, H, S, Dh)
        if self.rotary is not None:  # e.g. RoPE: rotate queries and keys by their positions
            q, k = self.rotary(q, k)
        # 3) attention in every head at once
        p = self.dropout if self.training else 0.0
        weights = None
        only_causal = is_causal and key_padding_mask is None and attn_mask is None
        if need_weights or not self.use_sdpa:
            o, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif only_causal:  # lets the kernel skip the masked blocks
            o = fused_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            o = fused_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, Dh)
        # 4) concatenate the heads and mix them with W^O
        o = rearrange(o, "b h l d -> b l (h d)")  # (B, L, D)
        return self.out_proj(o), (weights if need_weights else None)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"kdim={self.kdim}, vdim={self.vdim}, dropout={self.dropout}, "
            f"use_sdpa={self.use_sdpa}"
        )

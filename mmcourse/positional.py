"""Positional encodings: sinusoidal, learned, rotary (RoPE), 2-D for patch grids, modality types.

Self-attention treats its input as a set: permute the tokens and the outputs are permuted
the same way. Order has to be put in by hand, in one of three places:

* **added to the input** - a fixed sinusoidal table (Vaswani et al. 2017, 002 §4.3) or a
  learned table (BERT, GPT-2, ViT): ``x_p + PE(p)``;
* **rotated into queries and keys** - RoPE (Su et al. 2021; Llama): ``q_m^T R_{n-m} k_n``,
  so attention scores depend on the offset ``n - m`` only;
* **per axis** for images: half the channels encode the patch column, half the row (MAE).

Multimodal sequences add a **modality (type) embedding** per token so that the model can
tell an image token from a text token (002 §4.1).

Axis letters: B batch, N tokens (positions), D width, H heads, Dh head width, V vocabulary.

Taught in notebooks/03_positional_encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmcourse.attention import MultiHeadAttention
from mmcourse.train import accuracy  # the course's one accuracy, re-exported for notebook 03
from mmcourse.utils import non_negative_int, one_of, positive_float, positive_int

POSITIONS = ("none", "sinusoidal", "learned", "rope")


def _check_even_dim(dim: int, *, what: str = "dim") -> None:
    positive_int(**{what: dim})
    if dim % 2:
        raise ValueError(
            f"{what} must be even (sin/cos come in pairs, one frequency per pair), got {dim}"
        )


# --- 1. sinusoidal (Vaswani et al. 2017; 002 §4.3) ----------------------------------------


def sinusoidal_frequencies(dim: int, *, base: float = 10000.0) -> Tensor:
    """The angular frequencies of the sinusoidal encoding, one per sin/cos pair.

    Args:
        dim: d, the (even) width of the encoding.
        base: the constant 10000 of the formula.

    Returns:
        (d/2,) float64, ``omega_i = 1 / base^(2i/d)`` for i = 0 .. d/2 - 1. The wavelength of
        pair i is ``2 pi / omega_i``, from 2 pi up to ``2 pi * base^((d-2)/d)``.

    Taught in notebooks/03_positional_encoding.
    """
    _check_even_dim(dim)
    positive_float(base=base)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (d/2,): 2i = 0, 2, 4, ...
    return 1.0 / base ** (two_i / dim)


def sinusoidal_encoding(
    num_positions: int,
    dim: int,
    *,
    base: float = 10000.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The fixed sinusoidal position table, sin and cos interleaved.

    PE(pos, 2i) = sin(pos / base^(2i/d)),  PE(pos, 2i+1) = cos(pos / base^(2i/d)),
    for pos = 0 .. num_positions - 1 and i = 0 .. d/2 - 1 (i indexes the *pair*, not the
    dimension).

    Args:
        num_positions: N, how many positions (rows).
        dim: d, the even width of the encoding.
        base: the constant 10000 of the formula.
        device: where to build the table.

    Returns:
        (N, d) float32.

    Taught in notebooks/03_positional_encoding.
    """
    positive_int(num_positions=num_positions)
    # Built in float64 on the CPU (MPS has no float64), then moved: exact for long sequences.
    omega = sinusoidal_frequencies(dim, base=base)  # (d/2,)
    pos = torch.arange(num_positions, dtype=torch.float64)  # (N,)
    angle = pos[:, None] * omega[None, :]  # (N, d/2)
    pe = torch.empty(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)  # even dimensions 2i
    pe[:, 1::2] = torch.cos(angle)  # odd dimensions 2i+1
    return pe.to(device=device, dtype=torch.float32)


def sinusoidal_shift_matrix(offset: int | float, dim: int, *, base: float = 10000.0) -> Tensor:
    """The matrix M_k with PE(p + k) = M_k PE(p) for every position p.

    Each (sin, cos) pair of frequency omega_i is rotated by the angle k * omega_i:

        [sin((p+k)w)]   [ cos(kw)  sin(kw)] [sin(pw)]
        [cos((p+k)w)] = [-sin(kw)  cos(kw)] [cos(pw)]

    so M_k is block-diagonal with d/2 such 2 x 2 rotations and does not depend on p.

    Args:
        offset: k, the shift (may be negative).
        dim: d, the even width of the encoding.
        base: the constant of the formula.

    Returns:
        (d, d) float32, acting on column vectors (``PE @ M_k.T`` for a table of rows).

    Taught in notebooks/03_positional_encoding.
    """
    angle = offset * sinusoidal_frequencies(dim, base=base)  # (d/2,)
    c, s = torch.cos(angle), torch.sin(angle)
    blocks = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # (d/2, 2, 2)
    return torch.block_diag(*blocks).float()  # (d, d)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to a token sequence: ``x + PE[:N]``; no parameters.

    Args:
        dim: D, the even model width.
        base: the constant of the formula.

    Taught in notebooks/03_positional_encoding.
    """

    def __init__(self, *, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        _check_even_dim(dim)
        positive_float(base=base)
        self.dim, self.base = dim, base

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        pe = sinusoidal_encoding(x.shape[1], self.dim, base=self.base, device=x.device)  # (N, D)
        return x + pe.to(x.dtype)


# --- 2. learned absolute positions (BERT, GPT-2, ViT) -------------------------------------


class LearnedPositionalEmbedding(nn.Module):
    """A learned table of one vector per position, added to the tokens: ``x + E[:N]``.

    The table has ``num_positions`` rows, so the model cannot read a longer sequence, and
    rows that training never reached stay at their random initial values.

    Args:
        num_positions: the number of rows, the longest sequence accepted.
        dim: D, the model width.
        init_std: standard deviation of the random initial rows (GPT-2: 0.01-0.02; use the
            scale of the token embeddings it is added to).

    Taught in notebooks/03_positional_encoding.
    """

    def __init__(self, *, num_positions: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        positive_int(num_positions=num_positions, dim=dim)
        positive_float(init_std=init_std)
        self.num_positions, self.dim = num_positions, dim
        self.weight = nn.Parameter(torch.randn(num_positions, dim) * init_std)  # (N_max, D)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D); N must be at most ``num_positions``."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        n = x.shape[1]
        if n > self.num_positions:
            raise ValueError(
                f"sequence of {n} tokens is longer than num_positions={self.num_positions}: "
                f"a learned table has no row for positions {self.num_positions}..{n - 1}"
            )
        return x + self.weight[:n]


# --- 3. rotary position embedding (RoPE; Su et al. 2021, Llama's half-split layout) -------


def rope_cos_sin(
    num_positions: int,
    dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The cos and sin tables of rotary embeddings, in the half-split layout of Llama.

    Channel j and channel j + d/2 form a pair rotated by the angle ``pos * theta_j`` with
    ``theta_j = base^(-2j/d)``, j = 0 .. d/2 - 1; both tables repeat their d/2 columns twice.

    Args:
        num_positions: N, how many positions.
        dim: d, the even head width Dh.
        base: the constant (Llama: ``rope_theta``).
        device: where to build the tables.

    Returns:
        ``(cos, sin)``, each (N, d) float32.

    Taught in notebooks/03_positional_encoding.
    """
    positive_int(num_positions=num_positions)
    theta = sinusoidal_frequencies(dim, base=base)  # (d/2,), float64 on the CPU
    pos = torch.arange(num_positions, dtype=torch.float64)  # (N,)
    angle = pos[:, None] * theta[None, :]  # (N, d/2)
    angle = torch.cat([angle, angle], dim=-1)  # (N, d): pair j is (j, j + d/2)
    return (
        angle.cos().to(device=device, dtype=torch.float32),
        angle.sin().to(device=device, dtype=torch.float32),
    )


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: a 90-degree turn per pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every channel pair of every position by its angle: ``x cos + rotate_half(x) sin``.

    Args:
        x: (..., N, Dh) queries or keys.
        cos: (N, Dh) from :func:`rope_cos_sin` (or any shape that broadcasts and ends in
            (N, Dh)).
        sin: same shape as ``cos``.

    Returns:
        (..., N, Dh), the same dtype as ``x``.

    Taught in notebooks/03_positional_encoding.
    """
    if cos.shape != sin.shape or cos.dim() < 2 or cos.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"expected cos and sin of shape (N, Dh) = {tuple(x.shape[-2:])} to match x of shape "
            f"(..., N, Dh) = {tuple(x.shape)}, got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    if x.shape[-1] % 2:
        raise ValueError(f"the last axis of x (Dh) must be even, got {x.shape[-1]}")
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# --- 4. 2-D sin-cos for patch grids (MAE's get_2d_sincos_pos_embed) -----------------------


def _sincos_1d_blocks(positions: Tensor, dim: int, base: float) -> Tensor:
    """MAE's 1-D layout: all sines, then all cosines (concatenated, not interleaved).

    positions (M,) -> (M, dim) float64 with omega_k = 1 / base^(k / (dim/2)).
    """
    k = torch.arange(dim // 2, dtype=torch.float64)  # (dim/2,)
    omega = 1.0 / base ** (k / (dim / 2))  # (dim/2,)
    angle = positions.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=1)  # (M, dim)


def sincos_2d_encoding(grid_h: int, grid_w: int, dim: int, *, base: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos embeddings of a patch grid, in the layout of MAE.

    The patches are in row-major order (token ``r * grid_w + c`` is row r, column c, as
    :func:`mmcourse.modalities.patchify` makes them). The first D/2 channels encode the
    **column** c, the last D/2 the **row** r; each half is [sin block, cos block] with
    ``omega_k = 1 / base^(k / (D/4))``, k = 0 .. D/4 - 1. (MAE's code calls the first half
    ``emb_h``, but since ``np.meshgrid(grid_w, grid_h)`` puts w first it holds the column.)

    Args:
        grid_h: rows of patches.
        grid_w: columns of patches.
        dim: D, divisible by 4.
        base: the constant of the formula.

    Returns:
        (grid_h * grid_w, D) float32.

    Taught in notebooks/03_positional_encoding.
    """
    positive_int(grid_h=grid_h, grid_w=grid_w, dim=dim)
    positive_float(base=base)
    if dim % 4:
        raise ValueError(
            f"dim must be divisible by 4 (two axes, each with sin and cos halves), got {dim}"
        )
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_col = _sincos_1d_blocks(cols.reshape(-1), dim // 2, base)  # (h*w, D/2)
    emb_row = _sincos_1d_blocks(rows.reshape(-1), dim // 2, base)  # (h*w, D/2)
    return torch.cat([emb_col, emb_row], dim=1).float()  # (h*w, D)


# --- 5. modality (type) embeddings for mixed sequences (002 §4.1) -------------------------


class ModalityEmbedding(nn.Module):
    """One learned vector per modality, added to every token of that modality.

    Like BERT's token-type (segment) embedding and ViLT's modality-type embedding: the
    model can tell an image patch from a word even where their positions coincide.

    Args:
        num_modalities: M, how many modalities (ids 0 .. M-1).
        dim: D, the model width.

    Taught in notebooks/03_positional_encoding.
    """

    def __init__(self, *, num_modalities: int, dim: int) -> None:
        super().__init__()
        positive_int(num_modalities=num_modalities, dim=dim)
        self.num_modalities, self.dim = num_modalities, dim
        self.embedding = nn.Embedding(num_modalities, dim)  # (M, D)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        """x (B, N, D) and modality ids (N,) or (B, N) -> (B, N, D)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        if modality_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"modality_ids must be integers, got {modality_ids.dtype}")
        if modality_ids.shape not in (x.shape[1:2], x.shape[:2]):
            raise ValueError(
                f"expected modality_ids of shape (N,) = {tuple(x.shape[1:2])} or (B, N) = "
                f"{tuple(x.shape[:2])}, got {tuple(modality_ids.shape)}"
            )
        if modality_ids.numel() and (
            modality_ids.min() < 0 or modality_ids.max() >= self.num_modalities
        ):
            raise ValueError(
                f"modality ids must lie in [0, {self.num_modalities}), got values from "
                f"{int(modality_ids.min())} to {int(modality_ids.max())}"
            )
        return x + self.embedding(modality_ids)  # (B, N, D)


def concat_modalities(
    segments: Sequence[Tensor],
    *,
    modality_ids: Sequence[int] | None = None,
    markers: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Build one multimodal sequence X = [X^(1); X^(2); ...] and the modality id of each token.

    Args:
        segments: M tensors (B, L_m, D), one per modality segment, in sequence order.
        modality_ids: the modality id of each segment; ``0 .. M-1`` if None.
        markers: optional (num_modalities, D) marker vectors; ``markers[m]`` is put in front
            of every segment of modality m (002 §4.1's m_k, e.g. ``<image>``), and counts as
            a token of that modality.

    Returns:
        ``(x, ids)``: x (B, N, D) with N = sum of L_m (plus one per segment with markers),
        and ids (N,) int64.

    Taught in notebooks/03_positional_encoding.
    """
    if len(segments) == 0:
        raise ValueError("expected at least one segment (B, L_m, D), got none")
    ids = list(range(len(segments))) if modality_ids is None else list(modality_ids)
    if len(ids) != len(segments):
        raise ValueError(f"expected one modality id per segment ({len(segments)}), got {len(ids)}")
    first = segments[0]
    for m, seg in enumerate(segments):
        if seg.dim() != 3 or seg.shape[0] != first.shape[0] or seg.shape[2] != first.shape[2]:
            raise ValueError(
                f"expected every segment of shape (B, L_m, D) = ({first.shape[0]}, L_m, "
                f"{first.shape[-1]}), got {tuple(seg.shape)} for segment {m}"
            )
    for m in ids:
        non_negative_int(modality_id=m)
    B, _, D = first.shape
    if markers is not None and (
        markers.dim() != 2 or markers.shape[1] != D or max(ids) >= markers.shape[0]
    ):
        raise ValueError(
            f"expected markers of shape (num_modalities > {max(ids)}, {D}), "
            f"got {tuple(markers.shape)}"
        )
    parts, id_parts = [], []
    for m, seg in zip(ids, segments, strict=True):
        if markers is not None:
            parts.append(markers[m].to(seg.device, seg.dtype).expand(B, 1, D))  # (B, 1, D)
        parts.append(seg)  # (B, L_m, D)
        length = seg.shape[1] + (markers is not None)
        id_parts.append(torch.full((length,), m, dtype=torch.long, device=seg.device))
    return torch.cat(parts, dim=1), torch.cat(id_parts)  # (B, N, D), (N,)


# --- 6. a tiny transformer to test order sensitivity --------------------------------------


@dataclass
class OrderProbeConfig:
    """Sizes of the tiny transformer classifier of the order experiment."""

    vocab_size: int = 16  # V: token ids 0 .. V-1
    num_classes: int = 2  # classes of the sequence-level label
    dim: int = 32  # D: model width
    num_heads: int = 4  # H: attention heads; Dh = D / H must be even for RoPE
    num_layers: int = 2  # transformer blocks
    mlp_ratio: int = 2  # feed-forward hidden width, in multiples of D
    position: str = "rope"  # "none", "sinusoidal", "learned" or "rope"
    max_positions: int = 64  # rows of the learned table: the longest sequence it accepts
    base: float = 10000.0  # base of the sinusoidal and rotary frequencies
    dropout: float = 0.0  # dropout on attention weights and residual branches

    def __post_init__(self) -> None:
        positive_int(vocab_size=self.vocab_size, num_classes=self.num_classes, dim=self.dim)
        positive_int(num_heads=self.num_heads, num_layers=self.num_layers)
        positive_int(mlp_ratio=self.mlp_ratio, max_positions=self.max_positions)
        positive_float(base=self.base)
        one_of("position", self.position, POSITIONS)
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim must be divisible by num_heads, got dim={self.dim}, "
                f"num_heads={self.num_heads}"
            )
        if self.position == "rope" and (self.dim // self.num_heads) % 2:
            raise ValueError(
                "position='rope' needs an even head width dim / num_heads, got "
                f"{self.dim} / {self.num_heads} = {self.dim // self.num_heads}"
            )
        if self.position == "sinusoidal" and self.dim % 2:
            raise ValueError(f"position='sinusoidal' needs an even dim, got {self.dim}")


class Rotary(nn.Module):
    """RoPE as a hook of :class:`mmcourse.attention.MultiHeadAttention`: rotate q and k.

    Query i and key j are rotated by the angles of positions i and j, so their dot product
    depends on i - j only.

    Args:
        base: the RoPE base (Llama: ``rope_theta``).

    Taught in notebooks/03_positional_encoding.
    """

    def __init__(self, *, base: float = 10000.0) -> None:
        super().__init__()
        positive_float(base=base)
        self.base = float(base)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, L, Dh), (B, H, S, Dh) -> the same, rotated by positions 0..L-1 and 0..S-1."""
        L, S = q.shape[-2], k.shape[-2]
        cos, sin = rope_cos_sin(max(L, S), q.shape[-1], self.base, device=q.device)  # (N, Dh)
        return apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:S], sin[:S])

    def extra_repr(self) -> str:
        return f"base={self.base:g}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, config: OrderProbeConfig) -> None:
        super().__init__()
        D = config.dim
        rotary = Rotary(base=config.base) if config.position == "rope" else None
        self.ln_1 = nn.LayerNorm(D)
        self.attn = MultiHeadAttention(
            dim=D, num_heads=config.num_heads, dropout=config.dropout, rotary=rotary
        )
        self.ln_2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(
            nn.Linear(D, config.mlp_ratio * D),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * D, D),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OrderProbe(nn.Module):
    """A tiny transformer classifier: tokens -> embeddings (+ positions) -> blocks -> mean -> class.

    ``config.position`` chooses how order enters: not at all, a sinusoidal or a learned
    table added to the token embeddings, or RoPE inside every attention layer. The
    readout averages the tokens, so with ``"none"`` the whole model is a function of the
    *multiset* of tokens and cannot see their order.

    ``forward(tokens)`` maps (B, N) token ids to (B, num_classes) logits.

    Taught in notebooks/03_positional_encoding.
    """

    def __init__(self, config: OrderProbeConfig) -> None:
        super().__init__()
        self.config = config
        D = config.dim
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.position: nn.Module | None = None
        if config.position == "sinusoidal":
            self.position = SinusoidalPositionalEncoding(dim=D, base=config.base)
        elif config.position == "learned":
            # Same scale as the token table (nn.Embedding draws N(0, 1)), so that neither drowns
            # the other in the sum.
            self.position = LearnedPositionalEmbedding(
                num_positions=config.max_positions, dim=D, init_std=1.0
            )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N) int64 token ids -> (B, num_classes) logits."""
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"expected token ids of shape (B, N) and dtype int64, got {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got values from "
                f"{int(tokens.min())} to {int(tokens.max())}"
            )
        x = self.token_embedding(tokens)  # (B, N, D)
        if self.position is not None:
            x = self.position(x)  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x.mean(dim=1)))  # (B, D) -> (B, classes)


def which_comes_first(
    num_sequences: int,
    length: int,
    *,
    vocab_size: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The order task "which comes first, A or B?": random filler tokens with one A and one B.

    Token 0 is A, token 1 is B, tokens 2 .. V-1 are filler. A and B sit at two distinct
    random positions; the label is 1 when A comes before B, else 0. Both classes hold
    the same tokens, so nothing but order tells them apart (chance is 50%).

    Args:
        num_sequences: B.
        length: N >= 2.
        vocab_size: V >= 3.
        generator: the random stream.

    Returns:
        ``(tokens, labels)``: (B, N) int64 and (B,) int64.

    Taught in notebooks/03_positional_encoding.
    """
    positive_int(num_sequences=num_sequences, length=length, vocab_size=vocab_size)
    if length < 2 or vocab_size < 3:
        raise ValueError(
            f"need length >= 2 and vocab_size >= 3 (A, B and a filler), got length={length}, "
            f"vocab_size={vocab_size}"
        )
    B, N = num_sequences, length
    tokens = torch.randint(2, vocab_size, (B, N), generator=generator)  # (B, N) filler
    slots = torch.rand(B, N, generator=generator).argsort(dim=1)[:, :2]  # (B, 2) distinct
    rows = torch.arange(B)
    tokens[rows, slots[:, 0]] = 0  # A
    tokens[rows, slots[:, 1]] = 1  # B
    labels = (slots[:, 0] < slots[:, 1]).long()  # (B,) 1 if A comes first
    return tokens, labels


__all__ = [
    "POSITIONS",
    "sinusoidal_frequencies",
    "sinusoidal_encoding",
    "sinusoidal_shift_matrix",
    "SinusoidalPositionalEncoding",
    "LearnedPositionalEmbedding",
    "rope_cos_sin",
    "rotate_half",
    "apply_rotary",
    "sincos_2d_encoding",
    "ModalityEmbedding",
    "concat_modalities",
    "OrderProbeConfig",
    "Rotary",
    "Block",
    "OrderProbe",
    "which_comes_first",
    "accuracy",
]

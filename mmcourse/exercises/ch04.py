"""Exercises for notebooks/04_transformer_encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcourse.encoders import ViTConfig, ViTEncoder, count_parameters
from mmcourse.exercises import Exercise, Mismatch, NotAttempted, call, expect_close

# --- 1. the feed-forward network --------------------------------------------------------


def _ffn_solution(x: torch.Tensor, W1, b1, W2, b2) -> torch.Tensor:
    # FFN(x) = W2 GELU(W1 x + b1) + b2, for row vectors x: x W1^T
    return F.gelu(x @ W1.T + b1) @ W2.T + b2


def _check_ffn(fn) -> None:
    gen = torch.Generator().manual_seed(0)
    for B, N, D, F_ in [(1, 1, 4, 8), (2, 5, 6, 24), (3, 7, 16, 40)]:
        x = torch.randn(B, N, D, generator=gen) * 2
        W1, b1 = torch.randn(F_, D, generator=gen) / D**0.5, torch.randn(F_, generator=gen)
        W2, b2 = torch.randn(D, F_, generator=gen) / F_**0.5, torch.randn(D, generator=gen)
        what = f"x of shape {(B, N, D)}, W1 {(F_, D)}, W2 {(D, F_)}"
        got = call(fn, x.clone(), W1, b1, W2, b2, what=what)
        expected = _ffn_solution(x, W1, b1, W2, b2)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            mistakes = [
                (
                    F.relu(x @ W1.T + b1) @ W2.T + b2,
                    "you used ReLU (the 2017 Transformer's); BERT and ViT use GELU",
                ),
                (
                    F.gelu(x @ W1.T + b1, approximate="tanh") @ W2.T + b2,
                    "that is GELU's tanh approximation (GPT-2's 'gelu_new'); use the exact "
                    "erf form, torch.nn.functional.gelu(h)",
                ),
                (
                    (x @ W1.T + b1) @ W2.T + b2,
                    "there is no non-linearity: two linear layers in a row "
                    "collapse into one linear layer",
                ),
                (F.gelu(x @ W1.T) @ W2.T, "the biases b1 and b2 are missing"),
                (F.gelu(x @ W1.T + b1) @ W2.T, "the output bias b2 is missing"),
                (F.gelu(x @ W1.T) @ W2.T + b2, "the hidden bias b1 is missing"),
                (
                    x + F.gelu(x @ W1.T + b1) @ W2.T + b2,
                    "you added the residual x: the block adds "
                    "it, the FFN itself is only W2 GELU(W1 x + b1) + b2",
                ),
            ]
            for wrong, message in mistakes:
                if torch.allclose(got, wrong, atol=1e-5) and not torch.allclose(
                    got, expected, atol=1e-5
                ):
                    raise Mismatch(f"{what}: {message}")
        expect_close(got, expected, f"FFN of {what}", atol=1e-5)


q1 = Exercise(
    "Exercise 1: the feed-forward network FFN(x) = W2 GELU(W1 x + b1) + b2",
    checker=_check_ffn,
    hints=[
        "The weights are stored like nn.Linear's: W1 has shape (F, D), so for row vectors "
        "x (..., D) the product W1 x is written x @ W1.T.",
        "h = GELU(x @ W1.T + b1) has shape (..., F); the output h @ W2.T + b2 has shape (..., D).",
    ],
    solution_fn=_ffn_solution,
)

# --- 2. a pre-norm block ----------------------------------------------------------------


def _pre_norm_solution(x, attention, ffn, norm1, norm2):
    x = x + attention(norm1(x))  # the residual stream x itself is never normalised
    x = x + ffn(norm2(x))
    return x


def _check_pre_norm(fn) -> None:
    D = 8
    with torch.random.fork_rng(devices=[]):  # fixed cases, without touching the learner's seed
        torch.manual_seed(0)
        attention = nn.Sequential(nn.Linear(D, D), nn.Tanh())  # stands in for self-attention
        ffn = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        x = torch.randn(2, 5, D) * 3 + 1
    norm1, norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
    with torch.no_grad():  # distinct scales, so swapping the norms shows
        norm1.weight.fill_(2.0)
        norm2.bias.fill_(0.5)
    with torch.no_grad():
        got = call(fn, x.clone(), attention, ffn, norm1, norm2, what="x of shape (2, 5, 8)")
        expected = _pre_norm_solution(x, attention, ffn, norm1, norm2)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            h = norm1(x + attention(x))
            post = norm2(h + ffn(h))
            h = norm1(x)
            h = h + attention(h)
            normalised_stream = h + ffn(norm2(h))
            h = x + attention(norm1(x))
            no_ffn_residual = ffn(norm2(h))
            mistakes = [
                (
                    post,
                    "that is a post-norm block (BERT's): LayerNorm after adding the residual. "
                    "Pre-norm normalises the input of each sublayer: x + attention(norm1(x))",
                ),
                (
                    normalised_stream,
                    "you replaced x by norm1(x) before adding: the residual must "
                    "carry the un-normalised x, x = x + attention(norm1(x))",
                ),
                (
                    _pre_norm_solution(x, attention, ffn, norm1, norm1),
                    "each sublayer has its own LayerNorm: use norm2 before the FFN",
                ),
                (no_ffn_residual, "the FFN's residual is missing: x = x + ffn(norm2(x))"),
                (
                    attention(norm1(x)) + ffn(norm2(attention(norm1(x)))),
                    "the residual connections are missing: add each sublayer's output to its input",
                ),
            ]
            for wrong, message in mistakes:
                if torch.allclose(got, wrong, atol=1e-5):
                    raise Mismatch(message)
    expect_close(got, expected, "pre-norm block output", atol=1e-5)


q2 = Exercise(
    "Exercise 2: the forward pass of a pre-norm block",
    checker=_check_pre_norm,
    hints=[
        "Two lines, one per sublayer: x = x + attention(norm1(x)), then the same with ffn and norm2.",
        "Compare with post-norm, x = norm1(x + attention(x)): the only change is where the "
        "LayerNorm sits.",
    ],
    solution_fn=_pre_norm_solution,
)

# --- 3. count the parameters of a ViT ---------------------------------------------------


def _vit_parameters_solution(config: ViTConfig) -> int:
    C, P, D, K = config.in_channels, config.patch_size, config.dim, config.num_classes
    F_, N = config.hidden_dim, config.num_patches + 1  # FFN width; tokens with [CLS]
    patch_embed = C * P * P * D + D  # Conv2d(C, D, P, stride=P): weights and biases
    cls_token = D
    positions = N * D if config.position == "learned" else 0  # sin-cos is a fixed buffer
    attention = 4 * (D * D + D)  # W^Q, W^K, W^V, W^O with biases
    ffn = (D * F_ + F_) + (F_ * D + D)  # (W1, b1), (W2, b2)
    norms = 2 * 2 * D  # two LayerNorms, each a scale and a shift
    final_norm = 2 * D if config.norm_first else 0  # only pre-norm needs one at the end
    head = D * K + K if K else 0
    blocks = config.num_layers * (attention + ffn + norms)
    return patch_embed + cls_token + positions + blocks + final_norm + head


_VIT_CASES = [
    ViTConfig(image_size=32, patch_size=8, dim=64, num_layers=2, num_heads=4, num_classes=24),
    ViTConfig(
        image_size=224, patch_size=16, dim=192, num_layers=12, num_heads=3, position="learned"
    ),
    ViTConfig(
        image_size=8,
        patch_size=2,
        in_channels=1,
        dim=32,
        num_layers=3,
        mlp_ratio=2.0,
        num_classes=10,
        position="learned",
    ),
    ViTConfig(image_size=16, patch_size=4, dim=16, num_layers=1, num_heads=2, norm_first=False),
]


def _vit_parameter_mistakes(config: ViTConfig) -> list[tuple[int, str]]:
    """(difference from the right count, what it means) for the usual slips."""
    D, N, L, K = config.dim, config.num_patches + 1, config.num_layers, config.num_classes
    F_ = config.hidden_dim
    mistakes = [
        (-D, "the [CLS] token (one learned D-vector) is missing"),
        (-D, "the patch embedding's bias (D values) is missing"),
        (
            -2 * D if config.norm_first else 0,
            "the final LayerNorm (scale and shift, 2D) is missing",
        ),
        (
            2 * D if not config.norm_first else 0,
            "a post-norm ViT has no final LayerNorm: its blocks already end in one",
        ),
        (-4 * D * L, "the four attention projection biases (4D per block) are missing"),
        (-4 * D * L, "the two LayerNorms of each block (2D each) are missing"),
        (-(F_ + D) * L, "the FFN biases (b1 of size F, b2 of size D) are missing"),
        (
            -3 * D * D * L - 3 * D * L,
            "only one of W^Q, W^K, W^V was counted (there are three, plus W^O)",
        ),
        (-(D * K + K), "the classifier head (D*K weights + K biases) is missing"),
    ]
    if config.position == "learned":
        mistakes += [
            (-N * D, "the learned position table (one D-vector per token) is missing"),
            (-D, "the position table also covers the [CLS] token: N = patches + 1 rows"),
        ]
    else:
        mistakes.append((N * D, "the sin-cos positions are a fixed buffer, not parameters"))
    return [(d, m) for d, m in mistakes if d != 0]


def _check_vit_parameters(fn) -> None:
    for config in _VIT_CASES:
        what = (
            f"ViTConfig(image_size={config.image_size}, patch_size={config.patch_size}, "
            f"in_channels={config.in_channels}, dim={config.dim}, num_layers={config.num_layers}, "
            f"mlp_ratio={config.mlp_ratio}, position={config.position!r}, "
            f"norm_first={config.norm_first}, num_classes={config.num_classes})"
        )
        got = call(fn, config, what=what)
        if got is None or got is Ellipsis:
            raise NotAttempted
        if not isinstance(got, int) or isinstance(got, bool):
            raise Mismatch(f"{what}: expected a whole number, got {got!r}")
        with torch.device("meta"):  # count without allocating memory
            expected = count_parameters(ViTEncoder(config))
        if got == expected:
            continue
        causes = [m for d, m in _vit_parameter_mistakes(config) if got - expected == d]
        why = "; or ".join(causes) if causes else f"off by {got - expected:+,}"
        raise Mismatch(f"{what}: expected {expected:,} parameters, got {got:,}. Probably {why}")


q3 = Exercise(
    "Exercise 3: count the parameters of a ViT from its config",
    checker=_check_vit_parameters,
    hints=[
        "Go part by part: patch embedding (a Conv2d with kernel P: C*P*P*D weights + D biases), "
        "the [CLS] token, positions (learned only), the blocks, the final norm, the head.",
        "One block: attention 4 (D*D + D), FFN (D*F + F) + (F*D + D), two LayerNorms 2 * 2D.",
        "The sin-cos table is a buffer (not trained); a post-norm ViT has no final LayerNorm.",
    ],
    solution_fn=_vit_parameters_solution,
)

# --- 4. attention_mask -> key_padding_mask ----------------------------------------------


def _key_padding_mask_solution(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask == 0  # tokenizer: 1 = real token; torch: True = padding, ignore


def _check_key_padding_mask(fn) -> None:
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    got = call(fn, attention_mask.clone(), what="attention_mask [[1,1,1,1],[1,1,0,0],[1,0,0,0]]")
    if got is None:
        raise NotAttempted
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"expected a tensor, got {type(got).__name__}")
    expected = _key_padding_mask_solution(attention_mask)
    if got.shape != expected.shape:
        raise Mismatch(f"expected shape {tuple(expected.shape)} (B, N), got {tuple(got.shape)}")
    if got.dtype != torch.bool:
        raise Mismatch(
            f"expected a boolean mask, got dtype {got.dtype}: a float mask would be *added* to "
            "the attention scores (0 and 1 change little), not used to hide keys"
        )
    if torch.equal(got, attention_mask.bool()):
        raise Mismatch(
            "the mask is inverted: True must mark the padding (the keys to ignore), as in "
            "nn.MultiheadAttention's key_padding_mask; you marked the real tokens"
        )
    if not torch.equal(got, expected):
        raise Mismatch(f"expected {expected.tolist()}, got {got.tolist()}")


q4 = Exercise(
    "Exercise 4: turn a tokenizer's attention_mask into a key_padding_mask",
    checker=_check_key_padding_mask,
    hints=[
        "The tokenizer writes 1 for a real token and 0 for padding; key_padding_mask wants "
        "True where a key must be ignored.",
    ],
    solution_fn=_key_padding_mask_solution,
)

"""A Llama-style causal language model written from scratch, equal to ``transformers``' Llama.

One decoder layer is

    h   = x + Attn(RMSNorm(x))          grouped-query attention with rotary positions
    out = h + SwiGLU(RMSNorm(h))        W_down (silu(W_gate h) * W_up h)

and the model is token embedding -> L layers -> RMSNorm -> LM head (tied to the embedding
in SmolLM2). ``CausalLM.from_transformers`` copies a ``LlamaForCausalLM``'s weights; the
parameter names are the ones ``transformers`` uses, without the ``model.`` prefix.

The **KV cache** keeps every layer's keys and values of the tokens already read, so the
next token costs one position's work instead of the whole prefix's. It is a tuple with
one ``(k, v)`` pair per layer, each (B, H_kv, T_past, Dh): a nest of batch-first tensors,
the state of a ``step_fn`` for :mod:`mmcourse.generation`.

Axis letters: B batch, T tokens, D width, H query heads, H_kv key/value heads, Dh head
width, V vocabulary, L layers.

Taught in notebooks/11_multimodal_llm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.positional import apply_rotary, rope_cos_sin
from mmcourse.utils import one_of, positive_float, positive_int

ATTENTIONS = ("sdpa", "eager")
KVCache = tuple[tuple[Tensor, Tensor], ...]  # per layer (k, v), each (B, H_kv, T_past, Dh)


@dataclass
class LlamaConfig:
    """Sizes of a Llama-style decoder; the defaults are SmolLM2-135M's."""

    vocab_size: int = 49152  # V, tokens in the vocabulary
    dim: int = 576  # D, the residual width (transformers: hidden_size)
    num_layers: int = 30  # L, decoder layers
    num_heads: int = 9  # H, query heads
    num_kv_heads: int = 3  # H_kv, key/value heads; H_kv < H is grouped-query attention
    head_dim: int = 64  # Dh, width of one head
    hidden_dim: int = 1536  # width of the SwiGLU feed-forward (intermediate_size)
    rope_base: float = 100000.0  # RoPE's base (rope_theta)
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    max_positions: int = 8192  # the context length: the longest sequence accepted
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    attention: str = "sdpa"  # "sdpa": the fused kernel; "eager": the textbook formula

    def __post_init__(self) -> None:
        positive_int(
            vocab_size=self.vocab_size,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_dim=self.hidden_dim,
            max_positions=self.max_positions,
        )
        positive_float(rope_base=self.rope_base, norm_eps=self.norm_eps)
        one_of("attention", self.attention, ATTENTIONS)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each key/value head serves a group of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_transformers(cls, config) -> LlamaConfig:
        """The same sizes as a ``transformers`` ``LlamaConfig``."""
        rope = getattr(config, "rope_parameters", None) or {}
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only plain RoPE is implemented, got {rope.get('rope_type')!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("only Llama without biases in attention and MLP is implemented")
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads,
            hidden_dim=config.intermediate_size,
            rope_base=float(base),
            norm_eps=float(config.rms_norm_eps),
            max_positions=config.max_position_embeddings,
            tie_embeddings=bool(config.tie_word_embeddings),
        )


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * g``: LayerNorm without the mean and the bias.

    Computed in float32 whatever the input dtype (as Llama does), then cast back.

    Args:
        dim: D, the normalised width.
        eps: added to the mean square.

    Taught in notebooks/11_multimodal_llm.
    """

    def __init__(self, *, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # g: (D,)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, T, Dh) -> (B, H_kv * groups, T, Dh): query head h reads key head h // groups."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=1)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """The textbook formula ``softmax(q k^T / sqrt(Dh) + mask) v``.

    Args:
        q: (B, H, T, Dh); k, v: (B, H, S, Dh); allowed: (B, 1, T, S) booleans.

    Returns:
        (B, H, T, Dh).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and a KV cache.

    Taught in notebooks/11_multimodal_llm.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.attention = c.attention
        self.q_proj = nn.Linear(c.dim, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        *,
        cos: Tensor,
        sin: Tensor,
        allowed: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, D), cos/sin (B, 1, T, Dh), allowed (B, 1, T, S) -> (B, T, D), (k, v).

        ``past`` holds the keys and values of the S - T earlier positions; the returned
        pair holds all S.
        """
        b, t, _ = x.shape
        # 1) project and split into heads
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B,H,T,Dh)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # 2) rotate queries and keys by their positions
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # 3) append to the cache: (B, H_kv, S, Dh)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, H, S, Dh)
        # 4) attend: the fused kernel, or the formula it computes
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
        else:
            out = eager_attention(q, kk, vv, allowed)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, H*Dh)
        return self.o_proj(out), (k, v)


class SwiGLU(nn.Module):
    """The gated feed-forward ``W_down (silu(W_gate x) * (W_up x))``."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``h = x + Attn(RMSNorm(x))``, ``out = h + MLP(RMSNorm(h))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim=config.dim, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(dim=config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(dim=config.dim, hidden_dim=config.hidden_dim)

    def forward(self, x: Tensor, **attn_kwargs) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(B, T, D) -> (B, T, D) and this layer's (k, v)."""
        a, kv = self.self_attn(self.input_layernorm(x), **attn_kwargs)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of every token counting only the real ones: (B, S) 0/1 -> (B, S) long.

    With left padding the first real token gets position 0, as in ``transformers``.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLM(nn.Module):
    """A Llama-style decoder-only language model.

    Args:
        config: the :class:`LlamaConfig`.

    Taught in notebooks/11_multimodal_llm.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)  # (V, D)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(dim=config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)  # (V, D)
        self.apply(_init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cos_sin(config.max_positions, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_positions, Dh)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Tensor, KVCache]:
        """Next-token logits for every position, and the extended KV cache.

        ``forward = lm_head(hidden_states(...))``; a loss that needs only a few positions'
        logits calls :meth:`hidden_states` and the head itself (the head is a (V, D) matmul
        per position, V = 49152 for SmolLM2).

        Args:
            input_ids: (B, T) token ids of the new positions, or
            inputs_embeds: (B, T, D) their embeddings (image tokens spliced in, say).
            attention_mask: (B, S) 1 for real tokens, 0 for (left) padding, over the
                S = T_past + T positions; default all ones.
            cache: the KV cache of the T_past earlier positions, or None.
            logits_to_keep: compute the logits of only the last this many positions
                (generation needs one); 0 keeps all T.

        Returns:
            ``(logits (B, T, V) float, cache)``; the cache now covers all S positions.
        """
        x, cache = self.hidden_states(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
        )
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x).float(), cache  # (B, T, V)

    def hidden_states(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """The final-normed hidden states (B, T, D) and the extended cache (see :meth:`forward`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}"
                )
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.dim:
            raise ValueError(
                f"expected inputs_embeds of shape (B, T, {self.config.dim}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        b, t, _ = inputs_embeds.shape
        past_len = 0 if cache is None else cache[0][0].shape[2]
        s = past_len + t
        if s > self.config.max_positions:
            raise ValueError(
                f"sequence of {s} tokens does not fit the context length "
                f"max_positions={self.config.max_positions}"
            )
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=device)
        if attention_mask.shape != (b, s):
            raise ValueError(
                f"expected attention_mask of shape (B, T_past + T) = {(b, s)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        real = attention_mask.bool()  # (B, S)
        pos = positions_from_mask(attention_mask)[:, past_len:]  # (B, T)
        cos = self.rope_cos[pos].unsqueeze(1)  # (B, 1, T, Dh)
        sin = self.rope_sin[pos].unsqueeze(1)
        query_at = torch.arange(past_len, s, device=device)  # (T,) absolute index of each query
        causal = torch.arange(s, device=device)[None, :] <= query_at[:, None]  # (T, S)
        allowed = causal[None] & real[:, None, :]  # (B, T, S)
        # a padding query sees nothing; let it see itself so that no softmax row is empty
        allowed = allowed | (torch.arange(s, device=device)[None, :] == query_at[:, None])[None]
        allowed = allowed.unsqueeze(1)  # (B, 1, T, S)

        x = inputs_embeds
        new_cache = []
        for i, layer in enumerate(self.layers):
            past = None if cache is None else cache[i]
            x, kv = layer(x, cos=cos, sin=sin, allowed=allowed, past=past)
            new_cache.append(kv)
        return self.norm(x), tuple(new_cache)  # (B, T, D)

    def step_fn(
        self, input_ids: Tensor, state: KVCache | None, attention_mask: Tensor
    ) -> tuple[Tensor, KVCache]:
        """The ``step_fn`` contract of :mod:`mmcourse.generation`: new ids + cache -> logits."""
        return self(input_ids, attention_mask=attention_mask, cache=state, logits_to_keep=1)

    @classmethod
    def from_transformers(cls, model, *, attention: str = "sdpa") -> CausalLM:
        """A copy of a ``transformers`` ``LlamaForCausalLM`` (same weights, same dtype/device).

        Args:
            model: a ``LlamaForCausalLM`` (e.g. from :func:`mmcourse.pretrained.load_language_model`).
            attention: "sdpa" or "eager".

        Returns:
            A :class:`CausalLM` in eval mode.
        """
        if not hasattr(model, "model") or not hasattr(model.model, "layers"):
            raise ValueError(
                f"expected a transformers LlamaForCausalLM, got {type(model).__name__}"
            )
        config = LlamaConfig.from_transformers(model.config)
        config.attention = attention
        weight = model.lm_head.weight
        with torch.device("meta"):
            ours = cls(config)
        state = {
            k.removeprefix("model."): v.detach().clone() for k, v in model.state_dict().items()
        }
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        result = ours.load_state_dict(state, strict=False, assign=True)
        unexpected = [k for k in result.unexpected_keys if "rotary" not in k]
        if unexpected:
            raise ValueError(f"weights the decoder has no place for: {unexpected[:5]}")
        if config.tie_embeddings:
            ours.lm_head.weight = ours.embed_tokens.weight
        cos, sin = rope_cos_sin(config.max_positions, config.head_dim, config.rope_base)
        ours.rope_cos, ours.rope_sin = cos.to(weight.device), sin.to(weight.device)
        missing = [n for n, p in ours.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"weights missing from the transformers model: {missing[:5]}")
        return ours.eval()

    def config_dict(self) -> dict:
        """The config as a plain dict (for printing)."""
        return asdict(self.config)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=std)


def sequence_log_prob(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy over the supervised positions (labels != ignore_index).

    Args:
        logits: (B, T, V), position t predicting token t + 1.
        labels: (B, T), ``ignore_index`` where nothing is supervised.

    Returns:
        Scalar loss (shifted inside: logits[:, :-1] against labels[:, 1:]).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected labels of shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    if not (labels[:, 1:] != ignore_index).any():
        raise ValueError("no position carries a label: the loss would be empty (zero)")
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=ignore_index,
    )


__all__ = [
    "ATTENTIONS",
    "KVCache",
    "LlamaConfig",
    "RMSNorm",
    "repeat_kv",
    "eager_attention",
    "Attention",
    "SwiGLU",
    "DecoderLayer",
    "positions_from_mask",
    "CausalLM",
    "sequence_log_prob",
]

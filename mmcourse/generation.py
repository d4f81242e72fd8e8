"""Decoding: greedy search, beam search and sampling for any decoder with a KV cache.

One library serves chapter 10's encoder-decoder captioner and chapter 11's Llama decoder
unchanged, because it only ever talks to the model through a **step function**:

    step_fn(input_ids, state, attention_mask) -> (logits, new_state)

      input_ids      (B, T_new) int64: the whole prompt at the first call, then the one new token
      state          None, or the caller's initial state at the first call (e.g. {"memory": image
                     tokens (B, N, D)}), then whatever the previous call returned (KV cache etc.)
      attention_mask (B, T_past + T_new): 1 for real tokens, 0 for left padding, over everything so far
      logits         (B, T_new, V); only the last position is read, so (B, 1, V) is fine too

A state is any nest (tuple / list / dict) of tensors whose dim 0 is the batch (a per-layer KV
cache (B, H, T, Dh), an encoder memory (B, N, D)); non-tensor leaves (ints, strings, None) are
passed through untouched. Generation **expands** it for beams and for several samples per
prompt (``repeat_interleave`` on dim 0, :func:`expand_state`) and **reorders** it when beams
swap places (``index_select`` on dim 0, :func:`reorder_state`). Objects with their own batch
methods are handled through a small hook: an object that has both

    batch_repeat_interleave(repeats: int) -> None     # in place, like repeat_interleave(dim=0)
    reorder_cache(index: LongTensor) -> None          # in place, like index_select(0, index)

is expanded and reordered by calling them; ``transformers``' ``Cache`` classes
(``DynamicCache`` ...) have exactly these two methods, so :func:`hf_step_fn` hands its real
cache over as the state.

The three decoding methods (chosen by :class:`GenerationConfig`, run by :func:`generate`):

- **greedy decoding** (贪心解码, :func:`greedy_search`): ``y_t = argmax_v p(v | y_<t, x)``;
- **beam search** (束搜索, :func:`beam_search`): keep the K prefixes with the highest
  log-probability ``sum_t log p(y_t | y_<t, x)``; a finished hypothesis is ranked by the
  **length-penalised** score ``sum_t log p / L ** alpha`` (长度惩罚, :func:`length_penalized_score`),
  L its generated length; one step of the search is :func:`beam_step`;
- **sampling** (:func:`sample`): draw ``y_t ~ softmax(z / tau)`` with temperature tau (温度),
  optionally restricted to the k most likely tokens (top-k sampling, :func:`top_k_filter`) or
  to the smallest set whose probability reaches p (nucleus or top-p sampling, 核采样,
  :func:`top_p_filter`), from a seeded ``torch.Generator``.

Decoding with the KV cache (键值缓存) feeds one new token per step; :func:`recompute_step_fn`
wraps a step function so that it ignores its cache and recomputes the whole prefix every
step (the reference the cache must equal, and the slow baseline chapter 11 times).

Checked against ``transformers`` 5.x ``generate`` in tests/test_generation.py: the same
sequences and beam scores for greedy and beam search, the same samples from the same seed.
What was matched (transformers/generation/utils.py, ``_sample`` and ``_beam_search``):

- greedy / sampling: a row that produced a stop token is finished; its later tokens are the
  pad id (default: the first stop id); decoding ends when every row is finished or after
  ``max_new_tokens``; the mask grows by a 1 for every row at every step.
- beam search keeps ``2K`` candidates per step (``(1 + number of stop ids) K`` when larger);
  a candidate ending in a stop token becomes a finished hypothesis only if it ranks among
  the top K candidates; the K best candidates that did not stop run on. At the last step
  (``max_new_tokens`` reached) the top K candidates all become hypotheses. The length
  penalty divides by the number of **generated** tokens (stop token included, prompt and
  its padding excluded). ``early_stopping``: True stops a prompt once K hypotheses are
  finished; False also stops once no running beam, at its current length, could beat the
  worst finished hypothesis; "never" estimates the best running score at
  ``max_new_tokens`` when ``length_penalty > 0``. The n-best list is sorted by score.

Differences, on purpose: (1) transformers' beam search pads finished hypotheses with
``pad_token_id or eos_token_id[0]``, so a pad id of **0** (falsy) pads with the stop id
instead; ours pads with the pad id that was asked for (greedy and sampling agree anyway).
(2) Greedy decoding and sampling also return ``sequences_scores`` (the total
log-probability of each output) and every method returns ``lengths``; ``generate`` returns
neither there. (3) Prompts must be int64 and left-padded (transformers only warns about
right padding, which then decodes after the padding).

Axis letters: B batch (prompts), K beams, R returned sequences per prompt, T tokens, V
vocabulary, C candidates per prompt in one beam step.

Taught in notebooks/10_captioning_and_vqa (decoding a captioner) and
notebooks/11_multimodal_llm (an LLM, the KV cache).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcourse.utils import non_negative_int, positive_int

logger = logging.getLogger(__name__)

StepFn = Callable[[Tensor, Any, Tensor], tuple[Tensor, Any]]
EARLY_STOPPING = (True, False, "never")
_NEG = -1.0e9  # "impossible" score, as transformers uses (not -inf: -inf - -inf is nan)


# --- configuration and output -------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode; validated at construction.

    Greedy decoding is ``num_beams=1, do_sample=False`` (the default), beam search
    ``num_beams > 1``, sampling ``do_sample=True`` (with ``num_beams=1``).
    """

    max_new_tokens: int = 20  # tokens to generate at most per sequence (stop token included)
    num_beams: int = 1  # K, the beam width; 1 for greedy decoding or sampling
    do_sample: bool = False  # draw the next token instead of taking the best
    temperature: float = 1.0  # tau > 0: sampling divides the logits by it
    top_k: int = 0  # sampling keeps the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # sampling keeps the smallest set with probability >= p; 1.0 keeps all
    length_penalty: float = 1.0  # alpha: a finished beam scores sum log p / L ** alpha
    early_stopping: bool | str = False  # beam search: True, False or "never" (see module doc)
    num_return_sequences: int = 1  # R: the n-best list (<= num_beams) or samples per prompt
    eos_token_id: int | Sequence[int] | None = None  # stop token id(s); None never stops early
    pad_token_id: int | None = None  # fills finished rows; default the first stop id
    output_scores: bool = False  # keep the per-step (rows, V) scores in the output (memory!)

    def __post_init__(self) -> None:
        positive_int(max_new_tokens=self.max_new_tokens)
        if not (isinstance(self.num_beams, int) and not isinstance(self.num_beams, bool)) or (
            self.num_beams < 1
        ):
            raise ValueError(
                f"num_beams must be an integer >= 1 (1: greedy or sampling), got {self.num_beams!r}"
            )
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        non_negative_int(top_k=self.top_k)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(
            self.length_penalty, (int, float)
        ):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.early_stopping not in EARLY_STOPPING or (
            isinstance(self.early_stopping, int) and not isinstance(self.early_stopping, bool)
        ):
            raise ValueError(
                f"early_stopping must be one of {list(EARLY_STOPPING)}, got {self.early_stopping!r}"
            )
        positive_int(num_return_sequences=self.num_return_sequences)
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported: set num_beams=1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} must be <= "
                f"num_beams={self.num_beams}: beam search returns at most its K beams"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError(
                f"greedy decoding returns one sequence per prompt, got num_return_sequences="
                f"{self.num_return_sequences}; use num_beams >= {self.num_return_sequences} "
                "or do_sample=True"
            )
        for token in self.eos_ids:
            non_negative_int(eos_token_id=token)
        if self.eos_token_id is not None and not self.eos_ids:
            raise ValueError("eos_token_id must be an id or a non-empty list of ids, got []")
        if self.pad_token_id is not None:
            non_negative_int(pad_token_id=self.pad_token_id)
        if not isinstance(self.output_scores, bool):
            raise ValueError(f"output_scores must be True or False, got {self.output_scores!r}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The stop ids as a tuple (empty: no stop token)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def fill_id(self) -> int | None:
        """The id written after a sequence has stopped: the pad id, else the first stop id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def method(self) -> str:
        """``"greedy"``, ``"beam"`` or ``"sample"``."""
        if self.num_beams > 1:
            return "beam"
        return "sample" if self.do_sample else "greedy"


@dataclass
class GenerationOutput:
    """What :func:`generate` returns; rows are prompt-major: row ``b * R + r`` is the r-th
    sequence of prompt b (R = ``num_return_sequences``)."""

    sequences: Tensor  # (B * R, T_prompt + T_gen) int64: prompt (left padding kept), then output
    sequences_scores: Tensor  # (B * R,) beam: length-penalised score; else sum of log p
    lengths: Tensor  # (B * R,) generated tokens up to and including the stop token
    scores: tuple[Tensor, ...]  # per step, with output_scores (else empty); greedy/sample:
    # (B * R, V) processed logits, beam search: (B * K, V) log-probabilities of the live beams
    # (what transformers returns as ``scores``)
    prompt_length: int  # T_prompt, the (padded) prompt's length: sequences[:, :T_prompt]

    @property
    def generated(self) -> Tensor:
        """(B * R, T_gen) the generated part only (stop and pad tokens included)."""
        return self.sequences[:, self.prompt_length :]


# --- state: expand and reorder along the batch --------------------------------------------


def _has_batch_hook(obj: Any) -> bool:
    return callable(getattr(obj, "batch_repeat_interleave", None)) and callable(
        getattr(obj, "reorder_cache", None)
    )


def _map_state(state: Any, fn: Callable[[Tensor], Tensor], hook: Callable[[Any], None]) -> Any:
    if state is None or isinstance(state, (int, float, str, bool)):
        return state
    if isinstance(state, Tensor):
        return state if state.dim() == 0 else fn(state)
    if _has_batch_hook(state):
        hook(state)
        return state
    if isinstance(state, dict):
        return {key: _map_state(value, fn, hook) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a namedtuple
        return type(state)(*(_map_state(value, fn, hook) for value in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_map_state(value, fn, hook) for value in state)
    raise TypeError(
        f"cannot expand or reorder a state of type {type(state).__name__}: expected tensors "
        "(dim 0 = batch) in tuples, lists or dicts, or an object with batch_repeat_interleave "
        "and reorder_cache methods"
    )


def expand_state(state: Any, repeats: int) -> Any:
    """Repeat every batch row of a state ``repeats`` times in a row (dim 0).

    Args:
        state: a nest of tensors (dim 0 = batch) or objects with the batch hook.
        repeats: copies of each row; row b becomes rows ``b * repeats ... b * repeats + repeats - 1``.

    Returns:
        The expanded state (hook objects are changed in place and returned).

    Taught in notebooks/10_captioning_and_vqa.
    """
    positive_int(repeats=repeats)
    if repeats == 1:
        return state
    return _map_state(
        state,
        lambda t: t.repeat_interleave(repeats, dim=0),
        lambda obj: obj.batch_repeat_interleave(repeats),
    )


def reorder_state(state: Any, index: Tensor) -> Any:
    """Pick batch rows of a state: row i of the result is row ``index[i]`` (dim 0).

    Args:
        state: a nest of tensors (dim 0 = batch) or objects with the batch hook.
        index: (B',) int64 row indices.

    Returns:
        The reordered state (hook objects are changed in place and returned).

    Taught in notebooks/10_captioning_and_vqa.
    """
    return _map_state(
        state,
        lambda t: t.index_select(0, index.to(t.device)),
        lambda obj: obj.reorder_cache(index),
    )


# --- the teachable pieces: filters, one beam step, the length penalty ---------------------


def top_k_filter(logits: Tensor, k: int, *, min_tokens_to_keep: int = 1) -> Tensor:
    """Keep the k largest logits of each row, set the others to -inf.

    Ties with the k-th largest value are kept (as ``transformers``' ``TopKLogitsWarper``).

    Args:
        logits: (..., V) scores.
        k: tokens to keep; 0 (or k >= V) keeps all.
        min_tokens_to_keep: keep at least this many.

    Returns:
        (..., V) filtered logits (a new tensor).

    Taught in notebooks/10_captioning_and_vqa.
    """
    non_negative_int(top_k=k)
    positive_int(min_tokens_to_keep=min_tokens_to_keep)
    if k == 0:
        return logits.clone()
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, p: float, *, min_tokens_to_keep: int = 1) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    Sort the probabilities, drop the tail whose cumulative mass is <= 1 - p (so the kept
    set has mass >= p), always keep at least ``min_tokens_to_keep`` (as ``transformers``'
    ``TopPLogitsWarper``).

    Args:
        logits: (..., V) scores.
        p: the nucleus mass, in (0, 1]; 1.0 keeps all.
        min_tokens_to_keep: keep at least this many.

    Returns:
        (..., V) filtered logits (a new tensor).

    Taught in notebooks/10_captioning_and_vqa.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    positive_int(min_tokens_to_keep=min_tokens_to_keep)
    if p == 1.0:
        return logits.clone()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
    drop_sorted = cumulative <= 1.0 - p
    drop_sorted[..., -min_tokens_to_keep:] = False  # the most likely tokens stay
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, config: GenerationConfig) -> Tensor:
    """The sampling distribution's logits: divide by the temperature, then top-k, then top-p.

    Greedy decoding and beam search use the logits unchanged (this returns them as they are).

    Args:
        logits: (B, V) next-token logits.
        config: the generation config.

    Returns:
        (B, V) processed logits (-inf where filtered out).
    """
    if not config.do_sample:
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return logits


def length_penalized_score(sum_log_probs: Tensor, length: Tensor | int, alpha: float) -> Tensor:
    """The score of a finished hypothesis: ``sum_t log p(y_t | y_<t, x) / L ** alpha``.

    alpha = 0 ranks by total log-probability (favours short outputs); alpha = 1 by the mean
    log-probability per token; alpha > 1 favours long outputs more.

    Args:
        sum_log_probs: (...) total log-probability of the generated tokens.
        length: L, the generated tokens (stop token included, prompt excluded), >= 1.
        alpha: the length penalty.

    Returns:
        (...) the score.

    Taught in notebooks/10_captioning_and_vqa.
    """
    return sum_log_probs / (length**alpha)


@dataclass
class BeamStep:
    """The candidates of one beam-search step, best first; all (B, C)."""

    scores: Tensor  # accumulated log-probability of the extended prefix
    beam: Tensor  # which of the K beams (0..K-1) it extends
    token: Tensor  # the appended token


def beam_step(log_probs: Tensor, beam_scores: Tensor, *, num_candidates: int) -> BeamStep:
    """One step of beam search: the best extensions of all K beams of each prompt.

    Every beam k of prompt b with score ``s_bk`` and every token v give a candidate with
    score ``s_bk + log p(v | beam)``; the ``num_candidates`` best of the K * V per prompt
    survive (sorted, best first).

    Args:
        log_probs: (B * K, V) next-token log-probabilities of each beam (prompt-major rows).
        beam_scores: (B, K) accumulated log-probabilities of the beams.
        num_candidates: C, candidates to keep per prompt (K, or 2K to have spares for beams
            that stop).

    Returns:
        A :class:`BeamStep` of (B, C) tensors.

    Taught in notebooks/10_captioning_and_vqa.
    """
    if log_probs.dim() != 2 or beam_scores.dim() != 2:
        raise ValueError(
            f"expected log_probs (B * K, V) and beam_scores (B, K), got "
            f"{tuple(log_probs.shape)} and {tuple(beam_scores.shape)}"
        )
    B, K = beam_scores.shape
    if log_probs.shape[0] != B * K:
        raise ValueError(
            f"log_probs has {log_probs.shape[0]} rows, expected B * K = {B} * {K} = {B * K}"
        )
    V = log_probs.shape[1]
    positive_int(num_candidates=num_candidates)
    if num_candidates > K * V:
        raise ValueError(f"num_candidates={num_candidates} exceeds the K * V = {K * V} extensions")
    total = log_probs.view(B, K, V) + beam_scores[:, :, None]  # (B, K, V)
    scores, flat = torch.topk(total.view(B, K * V), num_candidates, dim=1)  # (B, C)
    return BeamStep(scores=scores, beam=flat // V, token=flat % V)


# --- input checks and the model call --------------------------------------------------------


def _check_inputs(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be int64 (torch.long) token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(
            f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; expected at least one "
            "prompt of at least one token (e.g. a BOS token)"
        )
    if (input_ids < 0).any():
        raise ValueError("input_ids must be >= 0 (token ids)")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected the shape of "
            f"input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.long()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(
            "attention_mask must be left-padded (0s, then 1s in every row): generation appends "
            "tokens on the right"
        )
    if (mask[:, -1] == 0).any():
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"empty prompt: rows {rows} of attention_mask have no real token")
    return mask.to(input_ids.device)


def _next_logits(step_fn: StepFn, ids: Tensor, state: Any, mask: Tensor) -> tuple[Tensor, Any]:
    """Call the step function; return the last position's float32 logits (B, V) and the state."""
    out = step_fn(ids, state, mask)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("step_fn must return a pair (logits, new_state)")
    logits, state = out
    B, T = ids.shape
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[0] != B:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"step_fn must return logits of shape (B={B}, T_new={T}, V), got {shape}")
    if logits.shape[1] not in (1, T):
        raise ValueError(
            f"step_fn returned logits for {logits.shape[1]} positions; expected T_new={T} (or 1)"
        )
    return logits[:, -1, :].float(), state


def _check_vocab(input_ids: Tensor, vocab_size: int, config: GenerationConfig) -> None:
    if int(input_ids.max()) >= vocab_size:
        raise ValueError(
            f"input_ids hold id {int(input_ids.max())} but the model's vocabulary has "
            f"V={vocab_size} tokens"
        )
    for name, ids in (("eos_token_id", config.eos_ids), ("pad_token_id", (config.fill_id,))):
        for token in ids:
            if token is not None and token >= vocab_size:
                raise ValueError(f"{name}={token} is outside the vocabulary (V={vocab_size})")


# --- greedy decoding and sampling ---------------------------------------------------------


def _greedy_or_sample(
    step_fn: StepFn,
    input_ids: Tensor,
    mask: Tensor,
    state: Any,
    config: GenerationConfig,
    generator: torch.Generator | None,
) -> GenerationOutput:
    R = config.num_return_sequences
    if R > 1:  # R samples per prompt: R copies of each row, as transformers does
        input_ids = input_ids.repeat_interleave(R, dim=0)
        mask = mask.repeat_interleave(R, dim=0)
        state = expand_state(state, R)
    B = input_ids.shape[0]
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=input_ids.device)
    fill = config.fill_id
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    sum_log_probs = torch.zeros(B, device=input_ids.device)
    lengths = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    pieces, scores = [input_ids], []
    logits, state = _next_logits(step_fn, input_ids, state, mask)  # prefill: the whole prompt
    _check_vocab(input_ids, logits.shape[-1], config)
    for step in range(config.max_new_tokens):
        processed = process_logits(logits, config)  # (B, V)
        if config.output_scores:
            scores.append(processed)
        if config.do_sample:
            probs = processed.softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        else:
            token = processed.argmax(dim=-1)  # (B,)
        log_p = logits.log_softmax(dim=-1).gather(1, token[:, None]).squeeze(1)
        sum_log_probs += torch.where(unfinished, log_p, 0.0)  # finished rows add nothing
        lengths += unfinished.long()
        if eos.numel():
            token = torch.where(unfinished, token, torch.full_like(token, fill))
            unfinished &= ~torch.isin(token, eos)
        pieces.append(token[:, None])
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if not unfinished.any() or step == config.max_new_tokens - 1:
            break
        logits, state = _next_logits(step_fn, token[:, None], state, mask)
    return GenerationOutput(
        sequences=torch.cat(pieces, dim=1),
        sequences_scores=sum_log_probs,
        lengths=lengths,
        scores=tuple(scores),
        prompt_length=input_ids.shape[1],
    )


def greedy_search(
    step_fn: StepFn,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    state: Any = None,
    max_new_tokens: int = 20,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Greedy decoding: append the most likely token until a stop token or the length limit.

    Args:
        step_fn, input_ids, attention_mask, state: as :func:`generate`.
        max_new_tokens, eos_token_id, pad_token_id: as :class:`GenerationConfig`.

    Returns:
        A :class:`GenerationOutput` (``sequences_scores``: total log-probability).

    Taught in notebooks/10_captioning_and_vqa.
    """
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return generate(step_fn, input_ids, attention_mask=attention_mask, state=state, config=config)


def sample(
    step_fn: StepFn,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    state: Any = None,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Sampling: draw each token from ``softmax(z / tau)``, filtered by top-k then top-p.

    Args:
        step_fn, input_ids, attention_mask, state, generator: as :func:`generate`.
        The others: as :class:`GenerationConfig`.

    Returns:
        A :class:`GenerationOutput` (``sequences_scores``: total log-probability under the
        unfiltered model distribution at temperature 1).

    Taught in notebooks/10_captioning_and_vqa.
    """
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return generate(
        step_fn,
        input_ids,
        attention_mask=attention_mask,
        state=state,
        config=config,
        generator=generator,
    )


# --- beam search ----------------------------------------------------------------------------


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor (B, M, ...), index (B, C) -> (B, C, ...): per prompt, pick entries along dim 1."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam_search(
    step_fn: StepFn, input_ids: Tensor, mask: Tensor, state: Any, config: GenerationConfig
) -> GenerationOutput:
    B, T0 = input_ids.shape
    K, R = config.num_beams, config.num_return_sequences
    alpha, early_stopping = config.length_penalty, config.early_stopping
    max_length = T0 + config.max_new_tokens
    device = input_ids.device
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)
    C = max(2, 1 + len(config.eos_ids)) * K  # spare candidates for beams that stop
    fill = config.fill_id if config.fill_id is not None else -1
    # 1) K copies of every prompt; only copy 0 is live at first (the others score -1e9), so the
    #    first step does not pick the same token K times
    ids = input_ids.repeat_interleave(K, dim=0)  # (B * K, T0)
    mask = mask.repeat_interleave(K, dim=0)
    state = expand_state(state, K)
    running = ids.view(B, K, T0)  # (B, K, T) the live beams
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = _NEG
    # finished hypotheses: the K best so far per prompt, padded to max_length
    finished = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    finished[:, :, :T0] = running
    finished_scores = torch.full((B, K), _NEG, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # running beams may still win
    top_k_mask = torch.arange(C, device=device) < K  # only the top K candidates may finish
    scores = []
    logits, state = _next_logits(step_fn, ids, state, mask)  # prefill
    _check_vocab(input_ids, logits.shape[-1], config)
    for step in range(config.max_new_tokens):
        cur_len = T0 + step
        log_probs = logits.log_softmax(dim=-1)  # (B * K, V)
        if config.output_scores:
            scores.append(log_probs)
        # 2) the C best extensions of all beams
        cand = beam_step(log_probs, running_scores, num_candidates=C)  # (B, C)
        cand_seqs = torch.cat([_gather(running, cand.beam), cand.token[:, :, None]], dim=2)
        stops = torch.isin(cand.token, eos) | (cur_len + 1 >= max_length)  # (B, C)
        # 3) the K best candidates that did not stop run on
        live_scores = cand.scores + stops.float() * _NEG
        keep = torch.topk(live_scores, K, dim=1).indices  # (B, K)
        running = _gather(cand_seqs, keep)  # (B, K, cur_len + 1)
        running_scores = _gather(live_scores, keep)
        parent = _gather(cand.beam, keep)  # (B, K)
        # 4) stopped candidates among the top K become hypotheses (length-penalised); merge
        #    them with the finished ones and keep the K best
        just_finished = stops & top_k_mask[None, :]
        new_scores = length_penalized_score(cand.scores, cur_len + 1 - T0, alpha)
        full = is_finished.all(dim=1, keepdim=True) & (early_stopping is True)
        new_scores = new_scores + full.float() * _NEG
        new_scores = new_scores + (~improvable).float() * _NEG
        new_scores = new_scores + (~just_finished).float() * _NEG
        padded = F.pad(cand_seqs, (0, max_length - cur_len - 1), value=fill)  # (B, C, max_len)
        merged_scores = torch.cat([finished_scores, new_scores], dim=1)  # (B, K + C)
        best = torch.topk(merged_scores, K, dim=1).indices  # (B, K)
        finished = _gather(torch.cat([finished, padded], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        new_lengths = torch.full((B, C), step + 1, dtype=torch.long, device=device)
        finished_lengths = _gather(torch.cat([finished_lengths, new_lengths], dim=1), best)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)
        # 5) can a running beam still beat the worst hypothesis? (transformers' heuristic)
        generated = cur_len + 1 - T0
        if early_stopping == "never" and alpha > 0.0:
            generated = max_length - T0
        best_running = running_scores[:, :1] / (generated**alpha)
        worst_finished = torch.where(
            is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG
        )
        improvable = improvable & (best_running > worst_finished).any(dim=1, keepdim=True)
        go_on = (
            improvable.any()
            and not (is_finished.all() and early_stopping is True)
            and not stops.all()
        )
        if not go_on:
            break
        # 6) the cache follows the beams: row b * K + k now continues beam parent[b, k]
        rows = (parent + torch.arange(B, device=device)[:, None] * K).flatten()  # (B * K,)
        state = reorder_state(state, rows)
        mask = torch.cat([mask, mask.new_ones(B * K, 1)], dim=1)
        logits, state = _next_logits(step_fn, running[:, :, -1].reshape(B * K, 1), state, mask)
    lengths = finished_lengths[:, :R].reshape(B * R)
    sequences = finished[:, :R].reshape(B * R, max_length)[:, : T0 + int(lengths.max())]
    return GenerationOutput(
        sequences=sequences,
        sequences_scores=finished_scores[:, :R].reshape(B * R),
        lengths=lengths,
        scores=tuple(scores),
        prompt_length=T0,
    )


def beam_search(
    step_fn: StepFn,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    state: Any = None,
    num_beams: int = 4,
    max_new_tokens: int = 20,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Beam search: keep the K best prefixes; return the best length-penalised hypotheses.

    Args:
        step_fn, input_ids, attention_mask, state: as :func:`generate`.
        The others: as :class:`GenerationConfig`.

    Returns:
        A :class:`GenerationOutput`; for each prompt its R best hypotheses, best first, with
        their length-penalised scores.

    Taught in notebooks/10_captioning_and_vqa.
    """
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return generate(step_fn, input_ids, attention_mask=attention_mask, state=state, config=config)


# --- the entry point ------------------------------------------------------------------------


def generate(
    step_fn: StepFn,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    state: Any = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Decode from a step function (see the module docstring for its contract).

    Runs without autograd.

    Args:
        step_fn: ``step_fn(input_ids, state, attention_mask) -> (logits, new_state)``.
        input_ids: (B, T) int64 prompts, left-padded to a common length.
        attention_mask: (B, T) 1 for real tokens, 0 for left padding; None: all ones.
        state: the initial state handed to the first call (e.g. ``{"memory": (B, N, D)}``).
        config: how to decode (default: greedy, 20 new tokens).
        generator: the random stream for sampling (None: torch's global one).

    Returns:
        A :class:`GenerationOutput`.

    Taught in notebooks/10_captioning_and_vqa.
    """
    config = GenerationConfig() if config is None else config
    if not isinstance(config, GenerationConfig):
        raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if not callable(step_fn):
        raise ValueError("step_fn must be callable: step_fn(input_ids, state, attention_mask)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    mask = _check_inputs(input_ids, attention_mask)
    with torch.no_grad():
        if config.method == "beam":
            return _beam_search(step_fn, input_ids, mask, state, config)
        return _greedy_or_sample(step_fn, input_ids, mask, state, config, generator)


# --- step functions: a transformers causal LM, and the no-cache reference ------------------


def hf_step_fn(model: Any) -> StepFn:
    """A step function for a ``transformers`` causal LM, using its real KV cache.

    Positions come from the mask (``cumsum - 1``, 0 on padding), as ``generate`` computes
    them; a mask of all ones is not passed (the model builds its causal mask), again as
    ``generate`` does; only the last position's logits are computed when the model supports
    ``logits_to_keep``. The state is the model's ``Cache`` (``DynamicCache``), which has the
    batch hook (``batch_repeat_interleave``, ``reorder_cache``).

    Args:
        model: e.g. ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` (in eval mode).

    Returns:
        ``step_fn(input_ids, state, attention_mask) -> (logits (B, 1, V), cache)``.

    Taught in notebooks/11_multimodal_llm.
    """
    keeps_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def step_fn(input_ids: Tensor, state: Any, attention_mask: Tensor) -> tuple[Tensor, Any]:
        T_new = input_ids.shape[1]
        positions = (attention_mask.cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 0)
        extra = {"logits_to_keep": 1} if keeps_last else {}
        out = model(
            input_ids=input_ids,
            attention_mask=None if bool(attention_mask.all()) else attention_mask,
            position_ids=positions[:, -T_new:],
            past_key_values=state,
            use_cache=True,
            **extra,
        )
        return out.logits, out.past_key_values

    return step_fn


class _RecomputeState:
    """The state of :func:`recompute_step_fn`: the prefix so far and the caller's initial state.

    It has the batch hook, so generation expands and reorders it like any cache.
    """

    def __init__(self, prefix: Tensor, initial: Any) -> None:
        self.prefix = prefix  # (B, T) all tokens so far
        self.initial = initial  # what the caller passed as the first state

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.prefix = self.prefix.repeat_interleave(repeats, dim=0)
        self.initial = expand_state(self.initial, repeats)

    def reorder_cache(self, index: Tensor) -> None:
        self.prefix = self.prefix.index_select(0, index.to(self.prefix.device))
        self.initial = reorder_state(self.initial, index)


def recompute_step_fn(step_fn: StepFn) -> StepFn:
    """Wrap a step function so that every call recomputes the whole prefix (no KV cache).

    Each call feeds ``step_fn`` all tokens so far with the caller's initial state, throws
    the returned cache away and returns the last ``T_new`` positions' logits: the reference
    that cached decoding must equal, and O(T^2) work instead of O(T) per sequence.

    Args:
        step_fn: a step function (see the module docstring).

    Returns:
        A step function with the same contract.

    Taught in notebooks/11_multimodal_llm (the KV cache).
    """

    def recompute(input_ids: Tensor, state: Any, attention_mask: Tensor) -> tuple[Tensor, Any]:
        if isinstance(state, _RecomputeState):
            prefix = torch.cat([state.prefix, input_ids], dim=1)
            initial = state.initial
        else:  # the first call: state is the caller's initial state
            prefix, initial = input_ids, state
        # a fresh copy of the initial state: step_fn may change a cache object in place
        logits, _ = step_fn(prefix, _clone_state(initial), attention_mask)
        T_new = input_ids.shape[1]
        return logits[:, -min(T_new, logits.shape[1]) :], _RecomputeState(prefix, initial)

    return recompute


def _clone_state(state: Any) -> Any:
    """Tensors are immutable for our purposes; hook objects are deep-copied."""
    if state is None or isinstance(state, (Tensor, int, float, str, bool)):
        return state
    if isinstance(state, dict):
        return {key: _clone_state(value) for key, value in state.items()}
    if isinstance(state, (tuple, list)) and not hasattr(state, "_fields"):
        return type(state)(_clone_state(value) for value in state)
    return copy.deepcopy(state)

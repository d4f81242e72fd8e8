"""mmcourse.generation against transformers' generate, brute force and its own no-cache path."""

import itertools
import math
from collections import namedtuple

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from mmcourse.generation import (
    GenerationConfig,
    beam_search,
    beam_step,
    expand_state,
    generate,
    greedy_search,
    hf_step_fn,
    length_penalized_score,
    process_logits,
    recompute_step_fn,
    reorder_state,
    sample,
    top_k_filter,
    top_p_filter,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, EOS, PAD = 32, 2, 1


def _prefer(model, token, weight_scale):
    """Scale one row of the LM head so that the random model emits ``token`` now and then."""
    with torch.no_grad():
        model.lm_head.weight[token] *= weight_scale


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config).eval()
    _prefer(model, EOS, 3.0)
    return model


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=V,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=EOS,
    )
    model = GPT2LMHeadModel(config).eval()
    _prefer(model, EOS, 3.0)
    return model


@pytest.fixture(scope="module")
def models(llama, gpt2):
    return {"llama": llama, "gpt2": gpt2}


def _prompts(batch=3, length=5, seed=0):
    """Left-padded prompts of different lengths: row b has b pad tokens (row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, :b] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _hf_generate(model, ids, mask, **settings):
    return model.generate(
        ids,
        attention_mask=mask,
        output_scores=True,
        return_dict_in_generate=True,
        top_k=None,
        top_p=None,
        temperature=None,
        **settings,
    )


# --- greedy and beam search equal transformers' generate -----------------------------------


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_llama_greedy_and_beam_search_equal_generate(
    llama, num_beams, length_penalty, early_stopping
):
    ids, mask = _prompts()
    settings = dict(
        max_new_tokens=8,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=num_beams,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    if num_beams == 1:  # transformers warns about beam-only flags with greedy decoding
        settings.update(length_penalty=1.0, early_stopping=False)
    theirs = _hf_generate(llama, ids, mask, do_sample=False, **settings)
    config = GenerationConfig(output_scores=True, **settings)
    ours = generate(hf_step_fn(llama), ids, attention_mask=mask, config=config)
    assert torch.equal(ours.sequences, theirs.sequences)
    T0 = ids.shape[1]
    assert torch.equal(ours.sequences[:, :T0], ids.repeat_interleave(num_beams, 0))
    assert ours.generated.shape == (3 * num_beams, ours.sequences.shape[1] - T0)
    assert ours.lengths.max() == ours.generated.shape[1] and ours.lengths.min() >= 1
    assert len(ours.scores) == len(theirs.scores)
    for mine, hf in zip(ours.scores, theirs.scores, strict=True):  # per step, beam rows in order
        torch.testing.assert_close(mine, hf, atol=1e-5, rtol=0)
    if num_beams > 1:
        torch.testing.assert_close(
            ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_gpt2_greedy_and_beam_search_equal_generate(gpt2, num_beams):
    ids, mask = _prompts(seed=1)
    settings = dict(max_new_tokens=10, num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD)
    if num_beams > 1:
        settings.update(num_return_sequences=2, length_penalty=0.8)
    theirs = _hf_generate(gpt2, ids, mask, do_sample=False, **settings)
    ours = generate(hf_step_fn(gpt2), ids, attention_mask=mask, config=GenerationConfig(**settings))
    assert torch.equal(ours.sequences, theirs.sequences)
    if num_beams > 1:
        torch.testing.assert_close(
            ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_stop_tokens_occur_and_finished_rows_are_padded(models, name):
    """The tests above exercise stopping: the biased LM head emits EOS mid-sequence."""
    model = models[name]
    ids, mask = _prompts(batch=4, seed=2)
    out = greedy_search(
        hf_step_fn(model),
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    generated = out.generated
    stopped = (generated == EOS).any(dim=1)
    assert stopped.any() and out.lengths.min() < 12, "no row stopped early: the test is vacuous"
    for row, length in zip(generated, out.lengths.tolist(), strict=True):
        assert (row[:length] == EOS).sum() <= 1
        assert torch.all(row[length:] == PAD)
        if length < generated.shape[1]:
            assert row[length - 1] == EOS
    beams = beam_search(
        hf_step_fn(model), ids, attention_mask=mask, num_beams=3, num_return_sequences=3,
        max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    assert (beams.lengths < beams.generated.shape[1]).any()
    scores = beams.sequences_scores.view(4, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:]), "the n-best list is sorted, best first"


def test_several_stop_ids_equal_generate(llama):
    ids, mask = _prompts(seed=3)
    for num_beams in (1, 3):
        settings = dict(
            max_new_tokens=9, num_beams=num_beams, eos_token_id=[EOS, 7], pad_token_id=PAD
        )
        theirs = _hf_generate(llama, ids, mask, do_sample=False, **settings)
        ours = generate(
            hf_step_fn(llama), ids, attention_mask=mask, config=GenerationConfig(**settings)
        )
        assert torch.equal(ours.sequences, theirs.sequences)


def test_greedy_sequence_score_is_the_sum_of_token_log_probs(llama):
    ids, mask = _prompts(seed=4)
    out = greedy_search(
        hf_step_fn(llama), ids, attention_mask=mask, max_new_tokens=6, eos_token_id=EOS
    )
    T0 = ids.shape[1]
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(out.generated)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = llama(out.sequences, attention_mask=full_mask, position_ids=positions).logits
    log_p = logits[:, T0 - 1 : -1].log_softmax(-1).gather(2, out.generated[:, :, None]).squeeze(2)
    kept = torch.arange(out.generated.shape[1])[None, :] < out.lengths[:, None]
    torch.testing.assert_close(out.sequences_scores, (log_p * kept).sum(1), atol=1e-5, rtol=0)


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 1, 5])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
def test_top_k_and_top_p_filters_equal_transformers(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 10 + int(top_p * 10))
    logits = torch.randn(6, 50, generator=g) * 3
    for keep in (1, 3):
        if top_k:
            theirs = TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=keep)(None, logits.clone())
            torch.testing.assert_close(top_k_filter(logits, top_k, min_tokens_to_keep=keep), theirs)
        theirs = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=keep)(None, logits.clone())
        torch.testing.assert_close(top_p_filter(logits, top_p, min_tokens_to_keep=keep), theirs)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: torch.isfinite(top_p_filter(probs.log(), p)).squeeze(0).tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.95) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    assert torch.isfinite(top_k_filter(probs.log(), 2)).sum() == 2


@pytest.mark.parametrize(
    "top_k, top_p, temperature", [(0, 1.0, 1.0), (5, 1.0, 0.7), (0, 0.8, 1.3), (8, 0.9, 1.0)]
)
def test_sampling_equals_generate_under_the_same_seed(gpt2, top_k, top_p, temperature):
    """transformers draws from torch's global stream; a Generator seeded alike gives the same."""
    ids, mask = _prompts(seed=5)
    settings = dict(
        max_new_tokens=10,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        eos_token_id=EOS,
        pad_token_id=PAD,
        num_return_sequences=2,
    )
    torch.manual_seed(3)
    theirs = gpt2.generate(ids, attention_mask=mask, do_sample=True, **settings)
    ours = generate(
        hf_step_fn(gpt2),
        ids,
        attention_mask=mask,
        config=GenerationConfig(do_sample=True, **settings),
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours.sequences, theirs)
    again = sample(
        hf_step_fn(gpt2),
        ids,
        attention_mask=mask,
        generator=torch.Generator().manual_seed(3),
        **settings,
    )
    assert torch.equal(again.sequences, theirs)


def _fixed_logits_step_fn(logits):
    """A step function whose next-token logits are always ``logits`` (V,)."""

    def step_fn(input_ids, state, attention_mask):
        B, T = input_ids.shape
        return logits.expand(B, T, -1), state

    return step_fn


@pytest.mark.parametrize("top_k, top_p, temperature", [(4, 1.0, 1.0), (0, 0.7, 1.0), (6, 0.9, 0.5)])
def test_sampled_tokens_follow_the_filtered_softmax(top_k, top_p, temperature):
    """Total-variation distance to the target is small; to the unfiltered softmax, large."""
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.2, 0.0, -0.5, -1.0])
    n = 20000
    config = GenerationConfig(
        do_sample=True, max_new_tokens=1, top_k=top_k, top_p=top_p, temperature=temperature
    )
    target = process_logits(logits[None], config).softmax(-1)[0]
    out = generate(
        _fixed_logits_step_fn(logits),
        torch.zeros(n, 1, dtype=torch.long),
        config=config,
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(out.generated[:, 0], minlength=len(logits)).float()
    assert counts[target == 0].sum() == 0, "a filtered-out token was drawn"
    tv = 0.5 * (counts / n - target).abs().sum()
    # E[TV] <= 0.5 * sum sqrt(p (1 - p) / n) < 0.012 here; 0.025 is > 2x that
    assert tv < 0.025
    assert 0.5 * (counts / n - logits.softmax(-1)).abs().sum() > 0.1, "target indistinguishable"


def test_the_same_generator_seed_repeats_the_samples(llama):
    ids, mask = _prompts(seed=6)
    run = lambda seed: sample(
        hf_step_fn(llama), ids, attention_mask=mask, max_new_tokens=6, top_k=10,
        generator=torch.Generator().manual_seed(seed),
    ).sequences  # fmt: skip
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# --- brute force, the cache, the state -------------------------------------------------------


class ToyDecoder:
    """A history-dependent toy LM over a tiny vocabulary with an encoder memory.

    state = {"memory": (B, D), "history": (B, T)}: the next-token logits depend on the
    memory, on every token so far (through the history, the toy's "KV cache") and on the
    position. If generation expands or reorders the state wrongly, the logits change.
    """

    def __init__(self, vocab=4, dim=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab, dim, generator=g)
        self.mix = torch.randn(dim, vocab, generator=g)
        self.position = torch.randn(16, vocab, generator=g)
        self.calls = []

    def __call__(self, input_ids, state, attention_mask):
        history = (
            input_ids if "history" not in state else torch.cat([state["history"], input_ids], 1)
        )
        assert attention_mask.shape == history.shape
        self.calls.append(input_ids.shape)
        logits = []
        for t in range(history.shape[1] - input_ids.shape[1], history.shape[1]):
            h = self.embed[history[:, : t + 1]].cumsum(1)[:, -1] + state["memory"]  # (B, D)
            weights = torch.tanh(h * (t + 1))
            logits.append(weights @ self.mix * 2 + self.position[t])
        return torch.stack(logits, 1), {"memory": state["memory"], "history": history}

    def log_prob(self, prompt, memory, tokens):
        """log p(tokens | prompt, memory), one row, computed from scratch."""
        state, total, ids = {"memory": memory[None]}, 0.0, prompt[None]
        mask = torch.ones_like(ids)
        for token in tokens:
            logits, state = self(ids, state, mask)
            total += logits[0, -1].log_softmax(-1)[token].item()
            ids = torch.tensor([[token]])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
        return total


def _brute_force(toy, prompt, memory, *, vocab, max_new, eos, alpha):
    """The best length-penalised hypothesis over every sequence (EOS only at its end)."""
    best = (-math.inf, None)
    for length in range(1, max_new + 1):
        for tokens in itertools.product(range(vocab), repeat=length):
            if eos in tokens[:-1] or (length < max_new and tokens[-1] != eos):
                continue  # a hypothesis ends with EOS or at max_new tokens
            score = toy.log_prob(prompt, memory, tokens) / length**alpha
            best = max(best, (score, tokens))
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_a_beam_as_wide_as_all_sequences_is_exhaustive_search(alpha):
    vocab, max_new, eos = 4, 3, 3
    toy = ToyDecoder(vocab=vocab, seed=7)
    prompts = torch.tensor([[0, 1], [2, 0]])
    memory = torch.randn(2, 3, generator=torch.Generator().manual_seed(8))
    out = beam_search(
        toy, prompts, state={"memory": memory}, num_beams=vocab**max_new, max_new_tokens=max_new,
        length_penalty=alpha, early_stopping="never", eos_token_id=eos, pad_token_id=0,
    )  # fmt: skip
    for b in range(2):
        score, tokens = _brute_force(
            toy, prompts[b], memory[b], vocab=vocab, max_new=max_new, eos=eos, alpha=alpha
        )
        assert out.generated[b, : out.lengths[b]].tolist() == list(tokens)
        assert out.sequences_scores[b].item() == pytest.approx(score, abs=1e-5)


def test_the_dict_state_is_expanded_per_beam_and_follows_the_beams():
    """Two prompts decoded together equal each decoded alone: memory rows are never mixed."""
    toy = ToyDecoder(vocab=6, seed=9)
    prompts = torch.tensor([[0, 1, 2], [3, 4, 5]])
    memory = torch.randn(2, 3, generator=torch.Generator().manual_seed(10))
    settings = dict(num_beams=3, num_return_sequences=3, max_new_tokens=5, eos_token_id=5)
    together = beam_search(toy, prompts, state={"memory": memory}, **settings)
    calls = list(toy.calls)  # the prompt once per beam (B * K = 6 rows), then one token a step
    assert calls[0] == (6, 3) and all(shape == (6, 1) for shape in calls[1:])
    for b in range(2):
        alone = beam_search(
            toy, prompts[b : b + 1], state={"memory": memory[b : b + 1]}, **settings
        )
        width = alone.sequences.shape[1]
        assert torch.equal(together.sequences[3 * b : 3 * b + 3, :width], alone.sequences)
        torch.testing.assert_close(
            together.sequences_scores[3 * b : 3 * b + 3], alone.sequences_scores
        )
        for row in range(3):  # every hypothesis' score is its real log-probability
            n = alone.lengths[row].item()
            total = toy.log_prob(prompts[b], memory[b], alone.generated[row, :n].tolist())
            assert alone.sequences_scores[row].item() == pytest.approx(total / n, abs=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_recomputing_the_prefix(llama, num_beams):
    ids, mask = _prompts(seed=11)
    config = GenerationConfig(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=10,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    cached = generate(hf_step_fn(llama), ids, attention_mask=mask, config=config)
    recomputed = generate(
        recompute_step_fn(hf_step_fn(llama)), ids, attention_mask=mask, config=config
    )
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(
        cached.sequences_scores, recomputed.sequences_scores, atol=1e-5, rtol=0
    )


def test_recompute_feeds_the_whole_prefix_every_step():
    toy = ToyDecoder(vocab=5, seed=12)
    memory = torch.randn(1, 3)
    cached = greedy_search(toy, torch.tensor([[0, 1]]), state={"memory": memory}, max_new_tokens=4)
    calls = len(toy.calls)
    slow = greedy_search(
        recompute_step_fn(toy), torch.tensor([[0, 1]]), state={"memory": memory}, max_new_tokens=4
    )
    assert torch.equal(cached.sequences, slow.sequences)
    assert [shape[1] for shape in toy.calls[calls:]] == [2, 3, 4, 5]


class HookState:
    """An object with the batch hook, like transformers' Cache classes."""

    def __init__(self, rows):
        self.rows = rows

    def batch_repeat_interleave(self, repeats):
        self.rows = self.rows.repeat_interleave(repeats, dim=0)

    def reorder_cache(self, index):
        self.rows = self.rows[index]


def test_expand_and_reorder_state_walk_any_nest():
    Pair = namedtuple("Pair", "key value")
    x = torch.arange(3)[:, None].float()  # (3, 1): row b holds b
    state = {"layers": [Pair(x, x * 10), (x,)], "memory": x, "step": 4, "scale": torch.tensor(2.0)}
    state["cache"] = HookState(torch.arange(3))
    expanded = expand_state(state, 2)
    assert expanded["layers"][0].value[:, 0].tolist() == [0, 0, 10, 10, 20, 20]
    assert isinstance(expanded["layers"][0], Pair) and isinstance(expanded["layers"][1], tuple)
    assert expanded["step"] == 4 and expanded["scale"].item() == 2.0
    assert expanded["cache"].rows.tolist() == [0, 0, 1, 1, 2, 2]
    index = torch.tensor([5, 0, 2])
    picked = reorder_state(expanded, index)
    assert picked["memory"][:, 0].tolist() == [2, 0, 1]
    assert picked["cache"].rows.tolist() == [2, 0, 1]
    with pytest.raises(TypeError, match="cannot expand or reorder a state of type object"):
        expand_state({"bad": object()}, 2)


def test_hf_cache_is_expanded_and_reordered_through_the_hook(llama):
    from transformers import DynamicCache

    ids, mask = _prompts(batch=2, seed=13)
    _, cache = hf_step_fn(llama)(ids, None, mask)
    assert isinstance(cache, DynamicCache)
    keys = cache.layers[0].keys.clone()  # (B, H, T, Dh)
    expand_state({"kv": cache}, 3)
    assert torch.equal(cache.layers[0].keys, keys.repeat_interleave(3, 0))
    reorder_state(cache, torch.tensor([3, 0]))
    assert torch.equal(cache.layers[0].keys, keys[[1, 0]])


# --- the teachable pieces ---------------------------------------------------------------------


def test_beam_step_picks_the_best_extensions_of_all_beams():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -4.0]]).log_softmax(
        -1
    )  # (B*K=2, V=3)
    beam_scores = torch.tensor([[0.0, -2.0]])  # (B=1, K=2)
    step = beam_step(log_probs, beam_scores, num_candidates=3)
    total = (log_probs + beam_scores.T).flatten()
    best = total.topk(3).indices
    assert (
        step.beam[0].tolist() == (best // 3).tolist()
        and step.token[0].tolist() == (best % 3).tolist()
    )
    torch.testing.assert_close(step.scores[0], total[best])
    with pytest.raises(ValueError, match="expected B \\* K = 1 \\* 3 = 3"):
        beam_step(log_probs, torch.zeros(1, 3), num_candidates=2)


def test_length_penalized_score():
    assert length_penalized_score(torch.tensor(-6.0), 3, 1.0).item() == -2.0
    assert length_penalized_score(torch.tensor(-6.0), 4, 0.0).item() == -6.0
    assert length_penalized_score(torch.tensor(-8.0), 4, 0.5).item() == -4.0


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(do_sample=True, top_p=0.0), "top_p must be a number in \\(0, 1\\]"),
        (dict(do_sample=True, top_p=1.5), "top_p must be a number in \\(0, 1\\]"),
        (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be a finite number > 0"),
        (dict(top_k=-1), "top_k must be a non-negative integer"),
        (
            dict(num_beams=2, num_return_sequences=3),
            "num_return_sequences=3 must be <= num_beams=2",
        ),
        (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
        (dict(num_beams=2, do_sample=True), "beam search with sampling is not supported"),
        (dict(early_stopping="sometimes"), "early_stopping must be one of"),
        (dict(eos_token_id=[]), "eos_token_id must be an id or a non-empty list"),
        (dict(eos_token_id=-1), "eos_token_id must be a non-negative integer"),
    ],
)
def test_bad_configs_raise_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**settings)


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.zeros(2, 0, dtype=torch.long), None, "empty prompt"),
        (torch.zeros(0, 3, dtype=torch.long), None, "empty prompt"),
        (torch.zeros(2, 3), None, "input_ids must be int64"),
        (
            torch.zeros(3, dtype=torch.long),
            None,
            "expected input_ids of shape \\(B, T\\), got \\(3,\\)",
        ),
        ([[1, 2]], None, "input_ids must be a torch.Tensor"),
        (
            torch.ones(2, 3, dtype=torch.long),
            torch.ones(2, 4),
            "attention_mask has shape \\(2, 4\\)",
        ),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]]), "left-padded"),
        (
            torch.ones(2, 3, dtype=torch.long),
            torch.tensor([[0, 0, 0], [1, 1, 1]]),
            "left-padded|no real token",
        ),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 2, 1]]), "only 0 and 1"),
        (torch.full((1, 3), 40), None, "vocabulary has V=10"),
    ],
)
def test_bad_inputs_raise_clear_errors(ids, mask, message):
    step_fn = _fixed_logits_step_fn(torch.zeros(10))
    with pytest.raises(ValueError, match=message):
        generate(step_fn, ids, attention_mask=mask)


def test_bad_step_functions_and_arguments_raise_clear_errors():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="step_fn must return a pair"):
        generate(lambda i, s, m: torch.zeros(2, 3, 5), ids)
    with pytest.raises(ValueError, match="logits of shape \\(B=2, T_new=3, V\\)"):
        generate(lambda i, s, m: (torch.zeros(2, 5), s), ids)
    with pytest.raises(ValueError, match="logits for 2 positions"):
        generate(lambda i, s, m: (torch.zeros(2, 2, 5), s), ids)
    with pytest.raises(ValueError, match="eos_token_id=7 is outside the vocabulary"):
        generate(
            _fixed_logits_step_fn(torch.zeros(5)), ids, config=GenerationConfig(eos_token_id=7)
        )
    with pytest.raises(ValueError, match="config must be a GenerationConfig"):
        generate(_fixed_logits_step_fn(torch.zeros(5)), ids, config={"num_beams": 2})
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        generate(_fixed_logits_step_fn(torch.zeros(5)), ids, generator=0)


def test_beam_output_is_cropped_to_the_longest_returned_hypothesis():
    """The search runs two steps but the best hypothesis is one token: [EOS] at p = 0.87."""
    logits = torch.tensor([0.0, 0.0, 0.0, 3.0])  # token 3 is EOS
    prompt = torch.tensor([[0, 1]])
    out = beam_search(
        _fixed_logits_step_fn(logits), prompt, num_beams=2, max_new_tokens=5, eos_token_id=3
    )
    assert out.scores == ()  # output_scores is off by default
    out = generate(
        _fixed_logits_step_fn(logits), prompt,
        config=GenerationConfig(num_beams=2, max_new_tokens=5, eos_token_id=3, output_scores=True),
    )  # fmt: skip
    assert len(out.scores) == 2  # two steps ran
    assert out.sequences.tolist() == [[0, 1, 3]] and out.generated.tolist() == [[3]]
    assert out.lengths.tolist() == [1] and out.prompt_length == 2
    assert out.sequences_scores.item() == pytest.approx(logits.log_softmax(0)[3].item())


def test_pad_id_0_pads_beams_with_0_where_transformers_pads_with_eos(llama):
    """transformers' beam search fills with ``pad_token_id or eos`` (0 is falsy); ours with 0."""
    ids, mask = _prompts(seed=14)
    settings = dict(max_new_tokens=10, num_beams=3, num_return_sequences=3, eos_token_id=EOS)
    theirs = _hf_generate(llama, ids, mask, do_sample=False, pad_token_id=0, **settings).sequences
    ours = beam_search(hf_step_fn(llama), ids, attention_mask=mask, pad_token_id=0, **settings)
    after = torch.arange(ours.generated.shape[1])[None, :] >= ours.lengths[:, None]  # padding
    assert after.any(), "no hypothesis stopped early: the test is vacuous"
    T0 = ids.shape[1]
    assert torch.all(ours.generated[after] == 0) and torch.all(theirs[:, T0:][after] == EOS)
    assert torch.equal(ours.sequences[:, :T0], theirs[:, :T0])
    assert torch.equal(ours.generated[~after], theirs[:, T0:][~after])


@pytest.mark.gpu
@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_on_the_gpu_equals_generate(llama, num_beams):
    import copy

    from mmcourse.utils import get_device

    device = get_device("auto")
    model = copy.deepcopy(llama).to(device)  # the module's CPU model stays where it is
    ids, mask = (t.to(device) for t in _prompts(seed=15))
    settings = dict(
        max_new_tokens=8, num_beams=num_beams, num_return_sequences=num_beams,
        eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    theirs = _hf_generate(model, ids, mask, do_sample=False, **settings)
    ours = generate(
        hf_step_fn(model), ids, attention_mask=mask, config=GenerationConfig(**settings)
    )
    assert ours.sequences.device.type == device.type
    assert torch.equal(ours.sequences, theirs.sequences)
    if num_beams > 1:
        torch.testing.assert_close(
            ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=0
        )

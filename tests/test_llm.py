"""The from-scratch Llama decoder equals transformers' LlamaForCausalLM in value and gradient."""

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from mmcourse.llm import CausalLM, LlamaConfig, sequence_log_prob


def _hf_model(*, heads=4, kv_heads=2, tied=True, seed=0):
    torch.manual_seed(seed)
    config = HFLlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=100000.0,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


CASES = [
    dict(heads=4, kv_heads=2, tied=True),  # grouped-query, tied (SmolLM2's kind)
    dict(heads=4, kv_heads=4, tied=False),  # multi-head, untied
    dict(heads=4, kv_heads=1, tied=False),  # multi-query
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logits_and_gradients_equal_transformers(case, attention):
    hf = _hf_model(**case)
    ours = CausalLM.from_transformers(hf, attention=attention)
    assert ours.config.tie_embeddings == case["tied"]
    ids = torch.randint(0, 61, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    ref = hf(input_ids=ids, attention_mask=mask).logits
    logits, _ = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=1e-5)
    # gradients of the same loss with respect to every weight
    # supervise only positions whose predictor is a real token (not a padding output)
    real_before = torch.cat([torch.zeros(2, 1, dtype=torch.bool), real[:, :-1]], dim=1)
    labels = ids.masked_fill(~real_before, -100)
    sequence_log_prob(ref, labels).backward()
    sequence_log_prob(logits, labels).backward()
    hf_grads = {k.removeprefix("model."): p.grad for k, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_kv_cache_gives_the_same_logits_as_the_full_pass():
    torch.manual_seed(1)
    model = CausalLM(
        LlamaConfig(
            vocab_size=50,
            dim=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            hidden_dim=40,
            max_positions=32,
        )
    ).eval()
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0
    full, _ = model(ids, attention_mask=mask)
    logits, cache = model(ids[:, :6], attention_mask=mask[:, :6])
    steps = [logits]
    for t in range(6, 10):
        logits, cache = model.step_fn(ids[:, t : t + 1], cache, mask[:, : t + 1])
        steps.append(logits)
    assert cache[0][0].shape == (2, 2, 10, 8)  # (B, H_kv, T, Dh)
    stepped = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepped[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


def test_sdpa_and_textbook_attention_agree_in_value_and_gradient():
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=40,
        dim=24,
        num_layers=1,
        num_heads=6,
        num_kv_heads=2,
        head_dim=4,
        hidden_dim=30,
        max_positions=16,
    )
    fast = CausalLM(config)
    slow = CausalLM(LlamaConfig(**{**config.__dict__, "attention": "eager"}))
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 40, (3, 7))
    a, _ = fast(ids)
    b, _ = slow(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (n, p), q in zip(fast.named_parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_bad_inputs_are_refused():
    model = CausalLM(
        LlamaConfig(
            vocab_size=20,
            dim=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            hidden_dim=8,
            max_positions=8,
        )
    )
    with pytest.raises(ValueError, match="does not fit the context length max_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(ValueError, match=r"expected inputs_embeds of shape \(B, T, 8\)"):
        model(inputs_embeds=torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match=r"attention_mask of shape \(B, T_past \+ T\)"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(num_heads=9, num_kv_heads=2)
    with pytest.raises(ValueError, match="no position carries a label"):
        sequence_log_prob(torch.zeros(1, 3, 5), torch.full((1, 3), -100))


@pytest.mark.slow
def test_one_batch_overfit():
    torch.manual_seed(0)
    from mmcourse.train import TrainConfig, fit

    model = CausalLM(
        LlamaConfig(
            vocab_size=30,
            dim=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            hidden_dim=64,
            max_positions=16,
        )
    )
    ids = torch.randint(0, 30, (4, 12))
    result = fit(
        model,
        [ids],
        loss_fn=lambda m, x: sequence_log_prob(m(x)[0], x),
        config=TrainConfig(max_steps=150, lr=1e-2, progress=False, device="cpu"),
    )
    assert result.history[-1]["loss"] < 0.05 < result.history[0]["loss"]

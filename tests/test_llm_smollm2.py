"""With SmolLM2-135M-Instruct's real weights our decoder equals transformers (slow: loads 135 M)."""

import pytest
import torch

from mmcourse.generation import GenerationConfig, generate
from mmcourse.llm import CausalLM
from mmcourse.pretrained import load_language_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    tokenizer, hf = load_language_model()
    return tokenizer, hf, CausalLM.from_transformers(hf)


def _prompt(tokenizer, text):
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
    return torch.tensor([ids["input_ids"]])


def test_real_weights_give_the_same_logits(smollm2):
    tokenizer, hf, ours = smollm2
    ids = _prompt(tokenizer, "Name three colours of the rainbow.")
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        logits, _ = ours(ids)
    # float32 through 30 layers, logits of size ~20: summation order differs between the
    # two implementations; 1e-3 absolute is ~1e-5 of the logits' range.
    assert (logits - ref).abs().max() < 1e-3
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_greedy_continuation_is_the_same_token_for_token(smollm2):
    tokenizer, hf, ours = smollm2
    ids = _prompt(tokenizer, "What is the capital of France?")
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    config = GenerationConfig(max_new_tokens=20, eos_token_id=tokenizer.eos_token_id)
    out = generate(ours.step_fn, ids, config=config).sequences
    assert out.shape[1] > ids.shape[1] + 3
    assert torch.equal(out, ref[:, : out.shape[1]])

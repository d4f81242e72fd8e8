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


def test_encode_chat_matches_the_real_template_token_for_token(smollm2):
    """The piecewise encoding equals tokenizing the template's rendering in one go (no
    tokenization mismatch), and only the answers are labelled."""
    import numpy as np

    from mmcourse.data.shapes import generate_shapes
    from mmcourse.vlm import DIALOGUE_KINDS, IGNORE_INDEX, IMAGE_TOKEN, encode_chat, make_dialogue

    tokenizer = smollm2[0]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rng = np.random.default_rng(0)
    for objects in generate_shapes(6)["objects"]:
        for kind in DIALOGUE_KINDS:
            chat = make_dialogue(objects, kind, rng)
            ids, labels = encode_chat(tokenizer, chat, num_image_tokens=5, image_token_id=image_id)
            text = tokenizer.apply_chat_template(chat, tokenize=False)
            whole = tokenizer(text.replace("<image>", IMAGE_TOKEN * 5), add_special_tokens=False)
            assert ids == whole["input_ids"]
            answers = [m["content"] for m in chat if m["role"] == "assistant"]
            supervised = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
            assert supervised == "".join(a + "<|im_end|>" for a in answers)

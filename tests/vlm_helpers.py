"""A tiny word-level tokenizer with SmolLM2's chat template, and a tiny VLM, for fast tests."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmcourse.data.shapes import COLOURS, NUMBER_WORDS, POSITION_PHRASES, SHAPES, SIZES
from mmcourse.encoders import ViTConfig
from mmcourse.llm import CausalLM, LlamaConfig
from mmcourse.vlm import IMAGE_TOKEN, TowerConfig, VisionLanguageModel, VisionTower, make_projector

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = set(
        "system user assistant what colour is the shape object how many objects are "
        "there answer in one word describe image detail do and have same yes no only "
        "more than a an of it colour : , . ? there is".split()
    )
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS)
    for phrases in POSITION_PHRASES.values():
        for p in phrases:
            words |= set(p.split())
    tokens = SPECIAL + ["[UNK]"] + sorted(words | set(".,:?!"))
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIAL,
    )
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tok


def tiny_vlm(tokenizer, *, projector="mlp", image_tokens="regions", seed=0, max_positions=128):
    torch.manual_seed(seed)
    lm = CausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            dim=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            hidden_dim=64,
            max_positions=max_positions,
        )
    )
    # a real LM's embeddings are large enough for confident logits after the final RMSNorm;
    # 0.02 (the init) caps a tiny tied model's logits near 0.6, so that nothing can be fitted
    torch.nn.init.normal_(lm.embed_tokens.weight, std=0.3)
    tower = VisionTower(
        TowerConfig(ViTConfig(dim=16, num_layers=1, num_heads=2), image_tokens=image_tokens)
    )
    return VisionLanguageModel(
        lm=lm,
        projector=make_projector(projector, in_dim=16, out_dim=32),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        num_image_tokens=tower.config.num_image_tokens,
        tower=tower,
    )

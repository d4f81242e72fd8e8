"""mmcourse.finetune: parameter groups, freezing strategies, LoRALinear vs peft, CE gradients."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import BertConfig, BertModel

from mmcourse.encoders import TextEncoder, TextEncoderConfig
from mmcourse.finetune import (
    LoRALinear,
    apply_lora,
    apply_peft_lora,
    apply_strategy,
    freeze,
    full_finetune,
    linear_probe,
    lora_layers,
    merge_lora,
    param_groups,
    parameter_summary,
    top_k_layers,
    unfreeze,
)
from mmcourse.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tower(nn.Module):
    """A tiny text tower of our blocks plus a head."""

    def __init__(self, num_layers=3, classes=4):
        super().__init__()
        torch.manual_seed(0)
        cfg = TextEncoderConfig(
            vocab_size=50,
            dim=16,
            num_layers=num_layers,
            num_heads=2,
            hidden_dim=32,
            max_position_embeddings=16,
            dropout=0.0,
            attention_dropout=0.0,
        )
        self.encoder = TextEncoder(cfg)
        self.head = nn.Linear(16, classes)

    def forward(self, ids):
        return self.head(self.encoder(ids).last_hidden_state[:, 0])


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- parameter groups ---------------------------------------------------------------------


def test_param_groups_partition():
    model = Tower()
    model.encoder.blocks[0].requires_grad_(False)
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable) and len(ids) == len(set(ids))
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert all(p.dim() == 1 for p in groups[1]["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "head.bias" in no_decay and any("norm" in n and n.endswith("weight") for n in no_decay)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_parameter_summary():
    model = Tower()
    linear_probe(model, head=model.head)
    s = parameter_summary(model)
    assert s["trainable"] == 16 * 4 + 4
    assert s["total"] == sum(p.numel() for p in model.parameters())
    assert s["fraction"] == pytest.approx(s["trainable"] / s["total"])


# --- strategies ---------------------------------------------------------------------------


def test_strategies():
    model = Tower()
    assert _trainable(linear_probe(model, head=model.head)) == {"head.weight", "head.bias"}
    top = _trainable(top_k_layers(model, blocks=model.encoder.blocks, head=model.head, k=2))
    assert {n.split(".")[2] for n in top if n.startswith("encoder.blocks")} == {"1", "2"}
    assert not any(n.startswith("encoder.embeddings") for n in top) and "head.weight" in top
    assert _trainable(full_finetune(model)) == {n for n, _ in model.named_parameters()}
    for name in ("linear_probe", "top_k", "full"):
        apply_strategy(model, name, blocks=model.encoder.blocks, head=model.head, k=1)
    assert len(_trainable(freeze(model))) == 0
    assert len(_trainable(unfreeze(model))) == len(list(model.parameters()))


def test_strategy_bad_inputs():
    model = Tower()
    with pytest.raises(ValueError, match="strategy"):
        apply_strategy(model, "lora", blocks=model.encoder.blocks, head=model.head)
    with pytest.raises(ValueError, match="k must be at most"):
        top_k_layers(model, blocks=model.encoder.blocks, head=model.head, k=4)
    with pytest.raises(ValueError, match="k must"):
        top_k_layers(model, blocks=model.encoder.blocks, head=model.head, k=0)
    with pytest.raises(ValueError, match="head must be a submodule"):
        linear_probe(model, head=nn.Linear(2, 2))


# --- LoRA ---------------------------------------------------------------------------------


def _peft_pair(r=4, alpha=8.0, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(10, 7, bias=bias)
    ours = LoRALinear(nn.Linear(10, 7, bias=bias), r=r, alpha=alpha)
    ours.base_layer.load_state_dict(base.state_dict())
    wrapped = nn.Sequential()
    wrapped.add_module("proj", base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    theirs = inject_adapter_in_model(cfg, wrapped).proj
    with torch.no_grad():  # the same (non-zero) A and B in both
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return ours, theirs


def test_lora_linear_equals_peft_value_and_gradient():
    ours, theirs = _peft_pair()
    assert theirs.scaling["default"] == ours.scaling == 2.0
    x = torch.randn(3, 5, 10)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5
    )
    assert ours.base_layer.weight.grad is None


def test_lora_init_matches_peft_recipe():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=8, alpha=16)
    assert torch.equal(layer.lora_B.weight, torch.zeros(32, 8))
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert (
        layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    )
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # B = 0: starts as the base layer
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A.weight",
        "lora_B.weight",
    }


def test_lora_merge_same_output():
    ours, _ = _peft_pair(bias=False)
    merged = ours.merge()
    x = torch.randn(6, 10)
    torch.testing.assert_close(merged(x), ours(x), atol=1e-5, rtol=1e-5)
    assert isinstance(merged, nn.Linear) and merged.bias is None
    torch.testing.assert_close(ours.delta_weight(), 2.0 * ours.lora_B.weight @ ours.lora_A.weight)


def test_lora_bad_inputs():
    with pytest.raises(ValueError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=2, alpha=2)
    with pytest.raises(ValueError, match="r must"):
        LoRALinear(nn.Linear(2, 2), r=0, alpha=2)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(2, 2), r=1, alpha=0)
    with pytest.raises(ValueError, match="expected input"):
        LoRALinear(nn.Linear(3, 2), r=1, alpha=1)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(Tower(), target_modules=["query"])
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(Tower(), target_modules="q_proj")


def test_apply_lora_to_our_tower_and_merge():
    model = Tower()
    names = apply_lora(model.encoder, target_modules=["q_proj", "v_proj"], r=2, alpha=4)
    assert len(names) == 6 and len(lora_layers(model)) == 6
    trainable = _trainable(model)
    assert trainable >= {"head.weight", "head.bias"}  # the head is outside the tower
    assert all("lora_" in n for n in trainable - {"head.weight", "head.bias"})
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
    ids = torch.randint(0, 50, (3, 7))
    before = model(ids)
    merge_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)


def test_lora_tower_overfits_one_batch():
    model = Tower()
    apply_lora(model.encoder, target_modules=["q_proj", "v_proj", "linear1"], r=4, alpha=8)
    ids, y = torch.randint(0, 50, (8, 6)), torch.arange(8) % 4
    cfg = TrainConfig(max_steps=120, lr=0.02, progress=False, device="cpu")
    fit(model, [(ids, y)], loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), config=cfg)
    assert F.cross_entropy(model(ids), y).item() < 0.05


def test_peft_lora_on_bert():
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    total = sum(p.numel() for p in bert.parameters())
    apply_peft_lora(bert, target_modules=("query", "value"), r=2, alpha=4)
    trainable = [n for n, p in bert.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in bert.parameters() if p.requires_grad) == 2 * 2 * 2 * 2 * 16
    assert sum(p.numel() for p in bert.parameters()) == total + 2 * 2 * 2 * 2 * 16
    out = bert(input_ids=torch.randint(0, 60, (2, 5))).last_hidden_state
    assert out.shape == (2, 5, 16)


# --- cross-entropy gradients --------------------------------------------------------------


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    torch.manual_seed(0)
    z = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    F.cross_entropy(z, y).backward()
    by_hand = (torch.softmax(z.detach(), -1) - F.one_hot(y, 5).float()) / 6
    torch.testing.assert_close(z.grad, by_hand, atol=1e-6, rtol=1e-5)


def test_binary_cross_entropy_gradient_is_sigmoid_minus_y():
    torch.manual_seed(0)
    z = torch.randn(8, requires_grad=True)
    y = torch.randint(0, 2, (8,)).float()
    F.binary_cross_entropy_with_logits(z, y).backward()
    by_hand = (torch.sigmoid(z.detach()) - y) / 8
    torch.testing.assert_close(z.grad, by_hand, atol=1e-6, rtol=1e-5)

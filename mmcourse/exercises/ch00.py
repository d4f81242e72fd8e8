"""Exercises for notebooks/00_setup_and_tour: a warm-up that shows how checkers work."""

from __future__ import annotations

import torch
from torch import nn

from mmcourse.exercises import Exercise, Mismatch, call, expect_equal


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_count(fn) -> None:
    cases = {
        "nn.Linear(3, 2)": nn.Linear(3, 2),
        "nn.Linear(10, 5, bias=False)": nn.Linear(10, 5, bias=False),
        "a two-layer MLP": nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
    }
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    cases["an MLP whose first layer is frozen"] = frozen
    for what, model in cases.items():
        got = call(fn, model, what=what)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, int):
            raise Mismatch(f"on {what}: expected an int, got {type(got).__name__}")
        if what.startswith("an MLP whose") and got == sum(p.numel() for p in model.parameters()):
            raise Mismatch(f"on {what}: you counted frozen parameters too (check requires_grad)")
        expect_equal(got, _count_parameters(model), f"parameters of {what}")


q1 = Exercise(
    "Exercise 1: count the trainable parameters of a model",
    checker=_check_count,
    hints=[
        "model.parameters() yields tensors; tensor.numel() is its number of values.",
        "Only count tensors with p.requires_grad == True.",
    ],
    solution_fn=_count_parameters,
)

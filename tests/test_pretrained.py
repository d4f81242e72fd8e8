"""The bundled MiniLM: hash-checked, offline, and the same numbers as sentence-transformers."""

import shutil

import pytest
import torch

from mmcourse.pretrained import (
    EXPECTED_SHA256,
    ModelFileError,
    default_model_path,
    encode_sentences,
    load_text_encoder,
    mean_pooling,
    verify_model_files,
)


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def test_bundled_files_have_the_official_hashes():
    verify_model_files(default_model_path())


def test_model_is_the_expected_minilm(encoder):
    tokenizer, model = encoder
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (6, 384, 30522)
    n_params = sum(p.numel() for p in model.parameters())
    assert 22_000_000 < n_params < 23_000_000
    assert tokenizer.tokenize("Multimodal") == ["multi", "##mo", "##dal"]  # uncased WordPiece


def test_sentence_embeddings_equal_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    sentences = ["a red circle on the left", "a crimson disk", "the digit seven", "hello"]
    ours = encode_sentences(sentences, *encoder)
    reference = SentenceTransformer(str(default_model_path()), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    # and it is meaningful: a synonym caption is closer than an unrelated one
    assert ours[0] @ ours[1] > ours[0] @ ours[2]


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pooling(hidden, mask), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"expected hidden states \(B, N, D\)"):
        mean_pooling(hidden[0], mask)


def _copy_model(tmp_path):
    folder = tmp_path / "minilm"
    shutil.copytree(default_model_path(), folder)
    return folder


def test_corrupted_weights_are_refused_with_the_hashes(tmp_path):
    folder = _copy_model(tmp_path)
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00corrupt")
    with pytest.raises(ModelFileError) as err:
        load_text_encoder(folder)
    message = str(err.value)
    assert "model.safetensors" in message
    assert EXPECTED_SHA256["model.safetensors"] in message
    assert "pip install --force-reinstall" in message


def test_missing_vocab_is_refused(tmp_path):
    folder = _copy_model(tmp_path)
    (folder / "vocab.txt").unlink()
    with pytest.raises(ModelFileError, match="file missing: .*vocab.txt"):
        load_text_encoder(folder)


def test_unverified_local_copy_loads(tmp_path):
    folder = _copy_model(tmp_path)
    tokenizer, model = load_text_encoder(folder, verify=False)
    assert model.config.hidden_size == 384


def test_hub_names_need_explicit_opt_out():
    with pytest.raises(ModelFileError, match="verify=False"):
        load_text_encoder("some-org/some-model")


def test_a_file_is_not_a_model_folder(tmp_path):
    file = tmp_path / "x.bin"
    file.write_bytes(b"")
    with pytest.raises(ModelFileError, match="expected a model folder"):
        load_text_encoder(file)

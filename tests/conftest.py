"""Shared fixtures: a tiny SentencePiece BPE model with LLaMA's settings."""

import pytest

from spm_fixture import load_spm, train_tiny_spm


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    train_tiny_spm(directory)
    return directory


@pytest.fixture(scope="session")
def sp(model_dir):
    return load_spm(model_dir / "tokenizer.model")

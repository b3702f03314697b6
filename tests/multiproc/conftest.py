"""Fixtures of the multi-process tests."""
import pytest


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny Qwen3 HF folder (untied, 2 KV heads, 300-token vocabulary), written once per module."""
    from tests.multiproc.test_hf_load import _save_tiny

    folder = tmp_path_factory.mktemp("hf")
    _save_tiny("qwen3", folder, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    return folder

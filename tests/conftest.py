"""Fixtures every test file may use: a generated corpus and its text directory. Helpers are in helpers.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat scripts

from helpers import make_corpus, write_txt_dir  # noqa: E402


@pytest.fixture
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture
def text_dir(tmp_path, corpus) -> Path:
    return write_txt_dir(tmp_path / "text", corpus)

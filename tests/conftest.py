"""Fixtures every test file may use: a generated corpus and its text directory. Helpers are in helpers.py."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's flat scripts

from helpers import make_corpus, write_txt_dir  # noqa: E402

# pytest-xdist's workers share the cores: each worker's own torch gets its share of them, not all of them
# (every worker at torch's default of one thread per core would make each op wait for the others).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture
def text_dir(tmp_path, corpus) -> Path:
    return write_txt_dir(tmp_path / "text", corpus)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """80 generated documents, one .txt each: the training runs' corpus (a file's runs share it)."""
    return write_txt_dir(tmp_path_factory.mktemp("corpus"), make_corpus(n_docs=80, seed=3))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """Where a file's training runs prepare corpus_dir once and find it again."""
    return tmp_path_factory.mktemp("data_cache")

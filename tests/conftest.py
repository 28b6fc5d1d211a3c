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


@pytest.fixture(scope="session", autouse=True)
def away_from_the_users_folders(tmp_path_factory):
    """The tests, and every script they run, start in an empty folder with caches of their own: a user's
    checkpoints/ (eval.py's and sample.py's default), data_cache/, the CPU probe and the Hugging Face cache are
    never read, whatever they hold. Each test then gets a folder of its own (in_a_folder_of_its_own)."""
    home = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        patch.setenv("XDG_CACHE_HOME", str(home / ".cache"))  # tokenizer.user_cache_dir, and huggingface's default
        patch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
        yield home


@pytest.fixture(autouse=True)
def in_a_folder_of_its_own(tmp_path_factory, monkeypatch):
    """What one test (or a script it runs) writes at a default relative path, another never reads."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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

"""What a new user met in a fresh clone (issue 45): a book as the corpus, or an empty one; errors that came after
the expensive part or behind another; short budgets; messages that did not name the way on; --help; the suite
itself after a run had left its checkpoints in the repository."""
import subprocess
import sys
from pathlib import Path

from helpers import REPO, run_command


# ----------------------------------------------------------------------------------------------------
# The suite beside a user's runs


def test_the_tests_and_the_scripts_they_run_start_away_from_the_repository_and_the_users_caches():
    assert REPO != Path.cwd() and REPO not in Path.cwd().parents  # where checkpoints/ of a user's run would be
    result = run_command([sys.executable, "-c", "import os, data; print(os.getcwd()); print(data.user_cache_dir())"])
    assert result.returncode == 0, result.stderr
    cwd, cache = map(Path, result.stdout.split())
    assert cwd == Path.cwd() and Path.home() / ".cache" not in cache.parents
    assert subprocess.run(["git", "status"], cwd=Path.cwd(), capture_output=True).returncode != 0  # no clone here

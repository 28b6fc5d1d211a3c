"""FineWeb arrives already tokenized (fineweb.py), from a stand-in for the Hub on 127.0.0.1 that serves shards in the
real layout and names: only the shards a run's documents need, the speedrun's validation tokens, the first step
before the last shard, an exact resume after kill -9 while shards still arrive, and the way back to tokenizing
when the pre-tokenized repository is missing."""
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fineweb
from helpers import (TINY_MODEL_ARGS, HubStandIn, child_env, make_corpus, metrics, run_command,
                     run_script, wait_for, write_pretokenized)
from shards import TokenShards

REPO = fineweb.PRETOKENIZED[("HuggingFaceFW/fineweb", "sample-10BT")]
SHARD = 1500  # tokens a training shard holds: documents cross shards, as in llm.c's


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """The repository's files (a validation shard and ~7 training shards) and its training documents' tokens."""
    folder = tmp_path_factory.mktemp("kjj0")
    docs = write_pretokenized(folder, REPO.prefix, make_corpus(n_docs=100, seed=11), SHARD, val_documents=12)
    return folder, docs


def fineweb_flags(cache, *extra) -> list[str]:
    return ["--dataset", "HuggingFaceFW/fineweb", "--subset", "sample-10BT", "--data_cache", str(cache), *extra]


def test_fineweb_arrives_tokenized_in_only_the_shards_its_documents_need(hub_files, tmp_path):
    folder, docs = hub_files
    wanted = 40  # document 41 opens inside a shard: the split ends right before it
    ends = np.cumsum([len(d) for d in docs])
    needed = int(ends[wanted - 1] // SHARD) + 1  # the shard where document 41 opens
    hub = HubStandIn({REPO.repo_id: folder})
    try:
        result = run_script("data.py", *fineweb_flags(tmp_path, "--sample_size", str(wanted)), env=hub.env())
        assert result.returncode == 0, result.stderr[-2000:]
        served = sorted(name for name, _ in hub.served)
        assert served == [REPO.file("train", i) for i in range(1, needed + 1)] + [REPO.file("val", 0)]
        assert "tokenizing" not in result.stderr and f"fetched {wanted} documents" in result.stdout
        again = run_script("data.py", *fineweb_flags(tmp_path, "--sample_size", str(wanted)), env=hub.env())
        assert again.returncode == 0 and len(hub.served) == len(served)  # all there: the Hub is not asked again
    finally:
        hub.close()
    run = fineweb.run_folder(str(tmp_path), REPO, wanted)
    train, val = TokenShards(run, "train"), TokenShards(run, "val")
    assert train.read(0, train.num_tokens).tolist() == [t for d in docs[:wanted] for t in d]
    val_file = folder / REPO.file("val", 0)
    assert val.read(0, val.num_tokens).tolist() == np.fromfile(val_file, dtype="<u2", offset=1024).tolist()
    assert not list(run.glob("*.bin"))  # the run's folder lists the shared shards; nothing was written again


# train_gpt2.py with blocks of 2 steps' windows (about 4 M tokens in a real run): a step waits for its own block
# only, so tiny data spans several blocks, as a real run's does.
SMALL_BLOCKS = "import sys, batches, train_gpt2; batches.BLOCK_TOKENS = 2 * 8 * 33; sys.exit(train_gpt2.main(sys.argv[1:]))"


def trainer(*flags: str, env: dict, wait: bool = True):
    command = [sys.executable, "-c", SMALL_BLOCKS, *flags]
    if wait:
        return run_command(command, env=env)
    return subprocess.Popen(command, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_first_step_comes_before_the_last_shard_and_a_kill_while_they_arrive_resumes_exactly(hub_files, tmp_path):
    folder, docs = hub_files
    wanted = 80
    needed = int(np.cumsum([len(d) for d in docs])[wanted - 1] // SHARD) + 1
    held = threading.Event()  # the last shard the documents need stays on the stand-in until the test lets it go
    last = REPO.file("train", needed)
    hub = HubStandIn({REPO.repo_id: folder}, delay=lambda name: held.wait(120) and 0.0 if name == last else 0.0)
    flags = [*fineweb_flags(tmp_path / "cache", "--sample_size", str(wanted)), *TINY_MODEL_ARGS, "--batch_size", "8",
             "--max_steps", "12", "--warmup_steps", "2", "--log_interval", "1", "--checkpoint_interval", "2",
             "--eval_interval", "6", "--num_workers", "2", "--no-amp", "--no-compile", "--device", "cpu"]
    save = tmp_path / "run"
    try:
        proc = trainer(*flags, "--save_dir", str(save), env=hub.env(), wait=False)
        # Its 12 steps read fewer shards than its 80 documents fill: the run trains, and saves, while the last
        # shard has not arrived.
        assert wait_for(lambda: (save / "latest.pt").exists(), proc, timeout=120), proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert last not in [name for name, _ in hub.served]  # killed while the data was still arriving
        held.set()
        resumed = trainer(*flags, "--save_dir", str(save), "--resume", env=hub.env())
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        whole = trainer(*flags, "--save_dir", str(tmp_path / "whole"), env=hub.env())
        assert whole.returncode == 0, whole.stderr[-2000:]
    finally:
        held.set()
        hub.close()
    final = lambda d: [r["val_loss"] for r in metrics(d) if "val_loss" in r][-1]
    assert final(save) == pytest.approx(final(tmp_path / "whole"), abs=1e-5)
    assert torch.load(save / "latest.pt", weights_only=True)["step"] == 12
    assert "; all " in whole.stdout  # the last evaluation read all of validation


def test_without_the_pre_tokenized_repository_the_text_is_streamed_and_tokenized_instead(tmp_path):
    hub = HubStandIn({})  # a Hub that holds neither the shards nor (for datasets' API) FineWeb itself
    try:
        result = run_script("data.py", *fineweb_flags(tmp_path, "--sample_size", "100"), env=hub.env(), timeout=120)
    finally:
        hub.close()
    lines = result.stderr.strip().splitlines()
    assert f"note: {REPO.repo_id} (FineWeb in GPT-2 tokens) is not on the Hub; streaming" in result.stdout
    assert result.returncode == 1 and len(lines) == 1 and "HuggingFaceFW/fineweb" in lines[0], result.stderr


def test_the_plan_says_what_fineweb_will_fetch_without_asking_the_hub(tmp_path):
    result = run_script("train_gpt2.py", "--plan", *fineweb_flags(tmp_path), "--sample_size", "1000000",
                        *TINY_MODEL_ARGS, "--batch_size", "8", "--device", "cpu", "--max_steps", "10")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{REPO.repo_id}, already in GPT-2 tokens: about 7 training shard(s) of 100 M tokens" in result.stdout
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing fetched or written

"""FineWeb arrives already tokenized (fineweb.py, download.py), from a stand-in for the Hub on 127.0.0.1 that serves
shards in the real layout and names, and fails as a Hub and a link fail: only the bytes a run's documents need, the
speedrun's validation tokens, the data whole through server errors and dropped connections, a run stopped with
latest.pt by what retries cannot mend, downloads continued where a kill left them, two runs sharing one cache, a
corrupt token id named in one line, and the way back to tokenizing when the pre-tokenized repository is missing."""
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fineweb
from helpers import (TINY_MODEL_ARGS, Cut, Hold, HubStandIn, child_env, make_corpus, metrics,
                     run_command, run_script, wait_for, write_pretokenized)
from shards import HEADER_BYTES, TokenShards, write_shard

REPO = fineweb.PRETOKENIZED[("HuggingFaceFW/fineweb", "sample-10BT")]
SHARD = 1500  # tokens a training shard holds: documents cross shards, as in llm.c's
FAST_RETRIES = "import download; download.RETRY_WAIT_S = (0.05, 0.05, 0.05); "  # the Hub's faults, tried again at once


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """The repository's files (a validation shard and ~7 training shards) and its training documents' tokens."""
    folder = tmp_path_factory.mktemp("kjj0")
    docs = write_pretokenized(folder, REPO.prefix, make_corpus(n_docs=100, seed=11), SHARD, val_documents=12)
    return folder, docs


def fineweb_flags(cache, *extra) -> list[str]:
    return ["--dataset", "HuggingFaceFW/fineweb", "--subset", "sample-10BT", "--data_cache", str(cache), *extra]


def shards_needed(docs, wanted: int) -> int:
    """The training shards that hold the first `wanted` documents: the last is where document wanted + 1 opens."""
    return int(np.cumsum([len(d) for d in docs])[wanted - 1] // SHARD) + 1


def test_fineweb_arrives_whole_through_server_errors_in_only_the_bytes_its_documents_need(hub_files, tmp_path):
    folder, docs = hub_files
    wanted = 40  # document 41 opens inside a shard: the split ends right before it
    needed = shards_needed(docs, wanted)
    val_tokens = 600  # validation as a prefix of the validation shard, as the speedrun's first 10,485,760 tokens
    faults = {HubStandIn.LISTING: [503], REPO.file("train", 1): [Cut(HEADER_BYTES + 300)],
              REPO.file("train", 2): [500, 503], REPO.file("val", 0): [Cut(100)]}
    code = f"import shards; shards.VAL_TOKENS = {val_tokens}; {FAST_RETRIES}import data; data.main()"
    hub = HubStandIn({REPO.repo_id: folder}, faults)
    try:
        result = run_command([sys.executable, "-c", code, *fineweb_flags(tmp_path, "--sample_size", str(wanted))],
                             env=hub.env())
        assert result.returncode == 0, result.stderr[-2000:]
        asked = list(hub.asked)
        again = run_command([sys.executable, "-c", code, *fineweb_flags(tmp_path, "--sample_size", str(wanted))],
                            env=hub.env())
        assert again.returncode == 0 and hub.asked == asked  # all there: the Hub is not asked again
    finally:
        hub.close()
    assert not any(hub.faults.values())  # every fault was met
    assert "tokenizing" not in result.stderr and f"fetched {wanted} documents" in result.stdout
    # Each needed shard fetched once, a dropped answer continued from the byte where it stopped; none past them.
    wanted_files = {REPO.file("train", i) for i in range(1, needed + 1)}
    assert {name for name, _ in asked} == wanted_files | {REPO.file("val", 0)}
    assert (REPO.file("train", 1), HEADER_BYTES + 300) in asked
    assert all(hub.sent[name] == (folder / name).stat().st_size for name in wanted_files)
    assert hub.sent[REPO.file("val", 0)] == HEADER_BYTES + 2 * val_tokens  # validation's bytes, not the shard's
    run = next(tmp_path.glob(f"{REPO.folder}-n{wanted}-*"))
    train, val = TokenShards(run, "train"), TokenShards(run, "val")
    assert train.read(0, train.num_tokens).tolist() == [t for d in docs[:wanted] for t in d]
    val_file = folder / REPO.file("val", 0)
    assert val.read(0, val.num_tokens).tolist() == np.fromfile(val_file, dtype="<u2", offset=1024)[:val_tokens].tolist()
    assert not list(run.glob("*.bin"))  # the run's folder lists the shared shards; nothing was written again


# train_gpt2.py with blocks of 2 steps' windows (about 4 M tokens in a real run): a step waits for its own block
# only, so tiny data spans several blocks, as a real run's does.
SMALL_BLOCKS = ("import sys, batches, train_gpt2; batches.BLOCK_TOKENS = 2 * 8 * 33; " + FAST_RETRIES +
                "sys.exit(train_gpt2.main(sys.argv[1:]))")
RUN_FLAGS = [*TINY_MODEL_ARGS, "--batch_size", "8", "--max_steps", "12", "--warmup_steps", "2", "--log_interval", "1",
             "--checkpoint_interval", "2", "--eval_interval", "6", "--num_workers", "2", "--no-amp", "--no-compile",
             "--device", "cpu"]
WANTED = 80  # the training runs' documents: more shards than their 12 steps read


def trainer(*flags: str, env: dict, wait: bool = True):
    command = [sys.executable, "-c", SMALL_BLOCKS, *flags]
    if wait:
        return run_command(command, env=env)
    return subprocess.Popen(command, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def final_val_loss(save_dir) -> float:
    return [r["val_loss"] for r in metrics(save_dir) if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def uninterrupted(hub_files, tmp_path_factory) -> float:
    """The final validation loss of the training runs' flags, run whole with a healthy Hub."""
    root = tmp_path_factory.mktemp("uninterrupted")
    hub = HubStandIn({REPO.repo_id: hub_files[0]})
    try:
        whole = trainer(*fineweb_flags(root / "cache", "--sample_size", str(WANTED)), *RUN_FLAGS, "--save_dir",
                        str(root / "run"), env=hub.env())
    finally:
        hub.close()
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "; all " in whole.stdout  # the last evaluation read all of validation
    return final_val_loss(root / "run")


def test_a_hub_gone_mid_file_then_a_kill_mid_download_each_stop_the_run_which_goes_on_from_there_exactly(
        hub_files, uninterrupted, tmp_path):
    folder, docs = hub_files
    last = REPO.file("train", shards_needed(docs, WANTED))
    cache, save = tmp_path / "cache", tmp_path / "run"
    flags = [*fineweb_flags(cache, "--sample_size", str(WANTED)), *RUN_FLAGS, "--save_dir", str(save)]
    run_folder, part = fineweb.run_folder(str(cache), REPO, WANTED), cache / REPO.folder / last
    size = lambda: part.stat().st_size if part.exists() else 0  # noqa: E731
    step = lambda: torch.load(save / "latest.pt", weights_only=True)["step"]  # noqa: E731

    # A 500, a 503, then the Hub gone in the middle of the last shard (connections refused, httpx's ConnectError):
    # once the tries are spent the run stops with latest.pt and one line, and marks nothing complete.
    half = HEADER_BYTES + 2 * 400
    hub = HubStandIn({REPO.repo_id: folder}, {last: [500, 503, Cut(half, gone=True)]})
    try:
        failed = trainer(*flags, env=hub.env())
    finally:
        hub.close()
    error = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert error.startswith("error: ") and f"downloading {last}" in error and "Hugging Face Hub" in error, error
    assert "ConnectError" in error and "continue with --resume" in error, error
    assert (save / "latest.pt").exists() and not (run_folder / "manifest.json").exists() and size() == half

    # Resumed: the last shard goes on from there, and the run is killed while 100 more bytes of it wait for the rest.
    held = threading.Event()
    hub = HubStandIn({REPO.repo_id: folder}, {last: [Hold(100, held)]})
    try:
        proc = trainer(*flags, "--resume", env=hub.env(), wait=False)
        failed_at = step()
        assert wait_for(lambda: size() == half + 100 and step() > failed_at, proc), proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert size() == half + 100 and hub.asked == [(last, half)]  # what arrived stays; nothing fetched again

        resumed = trainer(*flags, "--resume", env=hub.env())  # (the killed run's answer stays held)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert hub.asked[-1] == (last, half + 100) and size() == (folder / last).stat().st_size
    finally:
        held.set()
        hub.close()
    assert step() == 12 and final_val_loss(save) == pytest.approx(uninterrupted, abs=1e-5)
    left = {p.name for p in (cache / REPO.folder).iterdir() if not p.name.endswith(".lock")}
    assert left == {REPO.file("val", 0), *(p.name for p in folder.glob("*_train_*") if p.name <= last)}  # no leftovers


def test_two_runs_at_once_on_one_cache_each_train_while_each_shard_is_fetched_once(hub_files, uninterrupted, tmp_path):
    folder, docs = hub_files
    cache, last = tmp_path / "cache", REPO.file("train", shards_needed(docs, WANTED))
    held = threading.Event()  # the last shard comes only once both runs train: the two overlap
    hub = HubStandIn({REPO.repo_id: folder}, {last: [Hold(HEADER_BYTES + 100, held)]})
    try:  # their documents differ by one: each its own run folder, both reading the same shards
        procs = [trainer(*fineweb_flags(cache, "--sample_size", str(WANTED + k)), *RUN_FLAGS, "--save_dir",
                         str(tmp_path / f"run{k}"), env=hub.env(), wait=False) for k in range(2)]
        training = lambda k: (tmp_path / f"run{k}" / "metrics.jsonl").exists() and any(  # noqa: E731
            "train_loss" in row for row in metrics(tmp_path / f"run{k}"))
        assert all(wait_for(lambda: training(k), procs[k]) for k in range(2)), procs[0].communicate()[1][-2000:]
        held.set()
        outputs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        held.set()
        hub.close()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    assert set(hub.sent) == {REPO.file("val", 0), *(REPO.file("train", i) for i in range(1, shards_needed(docs, WANTED) + 1))}
    assert all(hub.sent[name] == (folder / name).stat().st_size for name in hub.sent)  # no byte fetched twice
    assert final_val_loss(tmp_path / "run0") == pytest.approx(uninterrupted, abs=1e-5)
    assert torch.load(tmp_path / "run1" / "latest.pt", weights_only=True)["step"] == 12


def test_a_token_id_past_the_vocabulary_stops_the_run_in_one_line_naming_the_shard(hub_files, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    for shard in hub_files[0].iterdir():
        (folder / shard.name).write_bytes(shard.read_bytes())
    first = folder / REPO.file("train", 1)
    tokens = np.fromfile(first, dtype="<u2", offset=HEADER_BYTES)
    tokens[100] = 50257  # GPT-2 has 50,257 tokens: the embedding has no row for it
    write_shard(first, [tokens])
    hub = HubStandIn({REPO.repo_id: folder})
    try:
        result = trainer(*fineweb_flags(tmp_path / "cache", "--sample_size", str(WANTED)), *RUN_FLAGS, "--save_dir",
                         str(tmp_path / "run"), env=hub.env())
    finally:
        hub.close()
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error.startswith("error: ") and "token id 50,257 (its token 100)" in error and REPO.file("train", 1) in error
    assert (tmp_path / "run" / "latest.pt").exists()  # where training began


def test_a_stop_while_the_first_shards_download_ends_the_run_at_once_and_the_next_run_goes_on_from_there(
        hub_files, tmp_path):
    folder, _ = hub_files
    cache, flags = tmp_path / "cache", [*RUN_FLAGS, "--save_dir", str(tmp_path / "run")]
    parts = {REPO.file("val", 0): HEADER_BYTES + 500}  # what arrives (the training shards come after it)
    held = threading.Event()
    hub = HubStandIn({REPO.repo_id: folder}, {name: [Hold(part, held)] for name, part in parts.items()})
    arrived = lambda name: (cache / REPO.folder / name).exists() and (cache / REPO.folder / name).stat().st_size  # noqa: E731
    try:
        proc = trainer(*fineweb_flags(cache, "--sample_size", str(WANTED)), *flags, env=hub.env(), wait=False)
        assert wait_for(lambda: all(arrived(name) == part for name, part in parts.items()), proc), \
            proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # not held up by the downloads it was waiting for
        assert "interrupted while preparing the data" in proc.communicate()[1]
        assert sorted(hub.asked) == sorted((name, 0) for name in parts)  # no download began after the signal
    finally:
        held.set()
        hub.close()
    assert all(arrived(name) == part for name, part in parts.items())
    hub = HubStandIn({REPO.repo_id: folder})
    try:
        result = run_script("data.py", *fineweb_flags(cache, "--sample_size", str(WANTED)), env=hub.env())
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr[-2000:]
    for name, part in parts.items():  # each went on from where it stopped
        assert (name, part) in hub.asked and hub.sent[name] == (folder / name).stat().st_size - part


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

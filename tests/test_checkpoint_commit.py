"""The commit protocol of run checkpoints (seqface_dist.train.commit) on real
filesystems: a folder counts only once its commit lists every file at its size and hash;
a full disk or a rank lost before the commit never yields one that looks complete."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from seqface_dist.train import commit
from seqface_dist.train.checkpoint import STATE_FILE, RunState, list_files

LOCAL = pafs.LocalFileSystem()


def _rank_files(folder: Path, rank: int, size: int) -> dict:
    """What one rank's upload brings: engine and head files (the sizes matter here)."""
    (folder / "engine" / "state").mkdir(parents=True, exist_ok=True)
    (folder / "engine" / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(
        os.urandom(size))
    (folder / f"head-rank{rank:05d}-of-00002.safetensors").write_bytes(os.urandom(size // 4))
    return {k: v for k, v in list_files(folder).items()
            if f"rank_{rank}_" in k or f"rank{rank:05d}" in k}


def _checkpoint(run: Path, step: int, *, committed: bool, size: int = 2000) -> Path:
    folder = run / commit.checkpoint_dir_name(step, "0123abcd")
    files = {**_rank_files(folder, 0, size), **_rank_files(folder, 1, size)}
    if committed:
        commit.commit(LOCAL, str(folder), RunState(step=step, world_size=2, files=files))
    return folder


def test_the_newest_committed_checkpoint_is_chosen_and_the_others_say_why(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, 10, committed=True)
    _checkpoint(run, 20, committed=False)  # a rank died between its upload and the commit
    cut = _checkpoint(run, 30, committed=True)
    victim = cut / "engine" / "state" / "zero_pp_rank_1_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:700])  # cut after the commit (a bad copy)
    found, skipped = commit.find_resumable(LOCAL, str(run))
    assert found is not None and found.step == 10
    assert len(skipped) == 2
    assert "zero_pp_rank_1_optim_states.pt has 700 bytes" in skipped[0]
    assert "no state.json" in skipped[1] and "000000020" in skipped[1]


def test_an_empty_run_folder_has_nothing_to_resume(tmp_path):
    assert commit.find_resumable(LOCAL, str(tmp_path / "new-run")) == (None, [])


def test_prune_keeps_the_newest_committed_and_never_a_newer_write(tmp_path):
    run = tmp_path / "run"
    for step, done in ((10, True), (20, False), (30, True), (40, True), (50, False)):
        _checkpoint(run, step, committed=done)
    commit.prune(LOCAL, str(run), newest_committed_step=40, keep=2)
    left = sorted(p.name for p in run.iterdir())
    assert left == [commit.checkpoint_dir_name(s, "0123abcd") for s in (30, 40, 50)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 600 KB filesystem (tmpfs); needs mount rights (root), else the test skips."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_that_fills_mid_upload_never_yields_a_complete_looking_checkpoint(
        tmp_path, small_disk):
    run = small_disk / "run"
    _checkpoint(run, 10, committed=True, size=40_000)  # ~100 KB: fits
    # The next checkpoint's ranks upload ~1 MB with pyarrow's copy (Ray's uploader).
    local = tmp_path / "rank-files"
    files = {**_rank_files(local, 0, 400_000), **_rank_files(local, 1, 400_000)}
    dest = run / commit.checkpoint_dir_name(20, "0123abcd")
    with pytest.raises(OSError):
        pafs.copy_files(str(local), str(dest), source_filesystem=LOCAL,
                        destination_filesystem=LOCAL)
    assert dest.is_dir() and any(dest.rglob("*.pt"))  # partly written
    # Had the commit been attempted anyway, it cannot land on a full disk either.
    with pytest.raises(OSError):
        commit.commit(LOCAL, str(dest), RunState(step=20, world_size=2, files=files))
    assert not (dest / STATE_FILE).exists()
    found, skipped = commit.find_resumable(LOCAL, str(run))
    assert found.step == 10 and "000000020" in skipped[0]
    state = commit.read_committed(LOCAL, found.path)  # and it is still whole, hashes too
    assert {k: v for k, v in list_files(found.path).items() if k != STATE_FILE} == state.files


def test_the_protocol_holds_on_s3_storage(tmp_path):
    # The same commit, choice and prune through pyarrow's S3 filesystem (what Ray Train
    # uploads with), against a real S3 HTTP server on loopback.
    from seqface_dist.data.testing import local_s3

    local = tmp_path / "rank-files"
    files = {**_rank_files(local, 0, 3000), **_rank_files(local, 1, 3000)}
    with local_s3("bucket"):
        fs, run = commit.filesystem("s3://bucket/runs/r1")
        for step, done in ((10, True), (20, False)):
            dest = f"{run}/{commit.checkpoint_dir_name(step, '0123abcd')}"
            pafs.copy_files(str(local), dest, source_filesystem=LOCAL, destination_filesystem=fs)
            if done:
                commit.commit(fs, dest, RunState(step=step, world_size=2, files=files))
        found, skipped = commit.find_resumable(fs, run)
        assert found.step == 10 and "no state.json" in skipped[0]
        assert commit.read_committed(fs, found.path).files == files
        commit.prune(fs, run, newest_committed_step=30, keep=1)  # as after a commit at 30
        assert [c.step for c in commit.candidates(fs, run)] == [10]

"""Checkpoint commits in the run's storage (local disk or S3, through pyarrow's filesystem,
the one Ray Train uploads with).

A run folder holds ``checkpoint-<step>`` folders. Each rank's files arrive by Ray's upload;
:func:`commit` then writes ``state.json``, the list of every file with its size and hash,
so only a folder whose uploads all finished can look complete. :func:`find_resumable`
picks the newest committed folder whose files are all there at their listed sizes (hashes
are checked after download, by ``check_complete``), saying why it skipped any newer one;
:func:`prune` deletes older folders once a newer one is committed, so a failed commit never
costs the last good checkpoint.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from seqface_dist.train.checkpoint import STATE_FILE, CheckpointError, RunState

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d{9})-([0-9a-f]{8})$")


def checkpoint_dir_name(step: int, attempt: str) -> str:
    """``checkpoint-<step>-<attempt>``: a restarted worker group (new ``attempt`` token)
    never writes into a folder a failed attempt left half-uploaded at the same step."""
    return f"checkpoint-{step:09d}-{attempt}"


@dataclass
class Candidate:
    path: str  # on the filesystem
    step: int


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a ``s3://`` URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def commit(fs: pafs.FileSystem, checkpoint_path: str, state: RunState) -> None:
    """Write ``state.json`` into the persisted folder: call only after every rank's upload
    returned. Written aside, then moved: a reader sees the whole file or none."""
    tmp = posixpath.join(checkpoint_path, STATE_FILE + ".tmp")
    with fs.open_output_stream(tmp) as out:
        out.write(state.to_json())
    fs.move(tmp, posixpath.join(checkpoint_path, STATE_FILE))


def read_committed(fs: pafs.FileSystem, checkpoint_path: str) -> RunState:
    """The state of a committed folder whose listed files all exist at their sizes."""
    where = posixpath.join(checkpoint_path, STATE_FILE)
    try:
        with fs.open_input_stream(where) as f:
            data = f.read()
    except (FileNotFoundError, OSError):
        raise CheckpointError(f"{checkpoint_path}: no {STATE_FILE} (its commit did not "
                              "happen: a rank failed or the storage filled mid-upload)") from None
    state = RunState.from_json(data, where)
    listed = sorted(state.files.items())
    infos = fs.get_file_info([posixpath.join(checkpoint_path, rel) for rel, _ in listed])
    for (rel, want), info in zip(listed, infos, strict=True):
        if info.type != pafs.FileType.File:
            raise CheckpointError(f"{checkpoint_path}: {rel} listed in {STATE_FILE} but "
                                  "missing")
        if info.size != want["bytes"]:
            raise CheckpointError(f"{checkpoint_path}: {rel} has {info.size:,} bytes, "
                                  f"{STATE_FILE} lists {want['bytes']:,} (cut mid-upload?)")
    return state


def candidates(fs: pafs.FileSystem, run_path: str) -> list[Candidate]:
    """The run's checkpoint folders, newest first (none if the run folder is new)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in infos:
        m = CHECKPOINT_DIR.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            found.append(Candidate(info.path, int(m.group(1))))
    return sorted(found, key=lambda c: -c.step)


def find_resumable(fs: pafs.FileSystem, run_path: str) -> tuple[Candidate | None,
                                                               list[str]]:
    """The newest committed checkpoint of a run folder, and why each newer one was skipped."""
    skipped = []
    for c in candidates(fs, run_path):
        try:
            read_committed(fs, c.path)
            return c, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def prune(fs: pafs.FileSystem, run_path: str, newest_committed_step: int, keep: int) -> None:
    """Delete every folder older than the ``keep`` newest committed ones (and uncommitted
    ones older than the newest commit); ``keep`` <= 0 keeps all."""
    if keep <= 0:
        return
    kept = 0
    for c in candidates(fs, run_path):
        if c.step > newest_committed_step:
            continue  # a newer write in flight is not ours to judge
        try:
            read_committed(fs, c.path)
            committed = True
        except CheckpointError:
            committed = False
        if committed and kept < keep:
            kept += 1
            continue
        fs.delete_dir(c.path)

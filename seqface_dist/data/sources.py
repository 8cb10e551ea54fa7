"""Turn the layouts users have into a flat, sorted list of build items.

- identity tree  ``ROOT/<identity>/<image>`` (images may sit in sub-folders of the identity)
- sequence tree  ``ROOT/<track>/<frame>`` or ``ROOT/<video>/<track>/<frame>``: the label
  is the folder holding the frames, relative to ROOT ("track" or "video/track")
- RecordIO       ``.rec`` (+ ``.idx``, + optional ``.lst`` naming each record's source)

Nothing is decoded here (the shard workers do that, in parallel); this pass only lists,
and puts aside what can be rejected by name: non-image files, empty folders, names that
escape the root, malformed records. Each rejection is a :class:`Problem`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from seqface_dist.data import recordio

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Item:
    """One image to put in a shard. ``loc`` says how to read its bytes (picklable)."""

    label: str  # source name of the identity / sequence: a key of the label map
    source: str  # where it came from, relative to the root (recorded in the sample json)
    loc: tuple  # ("file", abs_path) | ("rec", rec_path, offset)
    stamp: str  # size and mtime: a changed source changes the shard's fingerprint
    size: int  # bytes, for sizing shards


@dataclass(frozen=True)
class Problem:
    source: str
    reason: str

    def to_list(self) -> list[str]:
        return [self.source, self.reason]


def _inside(root_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def scan_tree(root: str, kind: str) -> tuple[list[Item], list[Problem]]:
    """List an identity tree (kind "identity") or a sequence tree (kind "sequence")."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    root_real = os.path.realpath(root)
    items: list[Item] = []
    problems: list[Problem] = []
    # os.walk does not follow symlinked folders; a symlinked file is checked below.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full) and not _inside(root_real, full):
                problems.append(Problem(f"{rel_dir}/{d}".lstrip("/"), "escapes the root"))
        if rel_dir and not filenames and not dirnames:
            problems.append(Problem(rel_dir + "/", "empty folder"))
            continue
        if not rel_dir:
            where = "an identity" if kind == "identity" else "a track"
            problems.extend(Problem(n, f"not inside {where} folder") for n in sorted(filenames))
            continue
        label = rel_dir.split("/", 1)[0] if kind == "identity" else rel_dir
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = f"{rel_dir}/{name}"
            if not _inside(root_real, full):
                problems.append(Problem(rel, "escapes the root"))
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
                problems.append(Problem(rel, "not an image file"))
                continue
            try:
                st = os.stat(full)
            except OSError as e:
                problems.append(Problem(rel, f"unreadable: {e.strerror}"))
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO named x.jpg would block the reader
                problems.append(Problem(rel, "not a regular file"))
                continue
            items.append(Item(label, rel, ("file", os.path.abspath(full)), _stamp(st), st.st_size))
    # An identity folder whose files were all rejected by name is empty for training.
    if kind == "identity":
        have = {it.label for it in items}
        for d in sorted(os.listdir(root)):
            if os.path.isdir(os.path.join(root, d)) and d not in have and not any(
                    p.source == d + "/" for p in problems):
                problems.append(Problem(d + "/", "empty folder (no image files)"))
    return items, problems


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not p.is_absolute() and ".." not in p.parts and ":" not in p.parts[0]


def _read_lst(lst_path: str) -> dict[int, str]:
    """``.lst`` (im2rec): ``index<TAB>label...<TAB>relative path`` per line."""
    names = {}
    with open(lst_path) as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 3:
                try:
                    names[int(cols[0])] = cols[-1]
                except ValueError:
                    continue
    return names


def _label_name(rec: recordio.Record) -> str | None:
    value = rec.label[0] if rec.label else None
    if value is None or value != value or value < 0 or value != int(value):
        return None
    return str(int(value))


def scan_recordio(rec_path: str, idx_path: str | None = None,
                  lst_path: str | None = None) -> tuple[list[Item], list[Problem]]:
    """List the image records of a ``.rec``; label names are the decimal labels."""
    if not os.path.isfile(rec_path):
        raise FileNotFoundError(f"{rec_path}: no such .rec file")
    if idx_path is None and os.path.isfile(os.path.splitext(rec_path)[0] + ".idx"):
        idx_path = os.path.splitext(rec_path)[0] + ".idx"
    names = _read_lst(lst_path) if lst_path else {}
    st = os.stat(rec_path)
    base = os.path.basename(rec_path)
    items: list[Item] = []
    problems: list[Problem] = []
    for rec in recordio.iter_records(rec_path, idx_path):
        if isinstance(rec, recordio.RecordIOError):
            problems.append(Problem(base, f"malformed record: {rec}"))
            continue
        source = f"{base}#{rec.key}"
        if rec.key in names:
            if not _safe_name(names[rec.key]):
                problems.append(Problem(f"{source} ({names[rec.key]})", "escapes the root"))
                continue
            source = names[rec.key]
        if not rec.image:
            if rec.flag == 0:
                problems.append(Problem(source, "record without an image"))
            continue  # flag > 0 without an image: insightface meta record
        label = _label_name(rec)
        if label is None:
            problems.append(Problem(source, f"label {rec.label[:1]} is not an index >= 0"))
            continue
        items.append(Item(label, source, ("rec", os.path.abspath(rec_path), rec.offset),
                          f"{_stamp(st)}@{rec.offset}", len(rec.image)))
    return items, problems


def read_item_bytes(item: Item) -> bytes:
    """The raw image bytes an item points at."""
    if item.loc[0] == "file":
        with open(item.loc[1], "rb") as f:
            return f.read()
    _, rec_path, offset = item.loc
    with open(rec_path, "rb") as f:
        payload = recordio.read_payload(f, offset, rec_path)
    return recordio.unpack(payload, -1, offset, rec_path).image


def label_sort_key(kind_of_source: str):
    """Sort label names: numerically for RecordIO labels, as text otherwise."""
    if kind_of_source == "recordio":
        return lambda s: (int(s), s)
    return lambda s: s

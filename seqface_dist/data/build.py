"""Build WebDataset shard sets from image folders, RecordIO files or in-memory arrays.

    from seqface_dist.data.build import BuildOptions, build_identity_tree
    report = build_identity_tree("faces/", "s3://bucket/ids", BuildOptions(workers=8))
    print(report.summary())

How a build goes:
1. list the source (``sources.py``); rejections by name become problems;
2. assign label indices from the sorted label names (DESIGN.md §4a);
3. shuffle the items with a fixed seed and cut them into shards of at most
   ``max_samples`` samples / ``max_bytes`` bytes; each shard gets a *fingerprint* of
   everything that goes into it (sources with size and mtime, indices, image settings);
4. write the shards in a process pool; a worker decodes each image (bad ones are skipped
   and listed), writes the tar to a scratch file and moves it into place (rename locally,
   multipart upload to S3), so a shard is either complete or absent;
5. write ``manifest.json`` last, and ``build_report.json`` listing every skipped input.

A shard whose fingerprint and size match the previous manifest (or the partial state an
interrupted build left, ``manifest.partial.json``) is not rewritten: an interrupted build
resumes, and rebuilding an unchanged source writes nothing at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context

import numpy as np
from PIL import Image

from seqface_dist.data import images, store
from seqface_dist.data.manifest import (
    KINDS,
    MANIFEST_NAME,
    PARTIAL_NAME,
    REPORT_NAME,
    Manifest,
    ManifestError,
    ShardEntry,
    ShardNameError,
    check_shard_name,
    load_manifest,
)
from seqface_dist.data.sources import (
    Item,
    Problem,
    label_sort_key,
    read_item_bytes,
    scan_recordio,
    scan_tree,
)
from seqface_dist.data.tario import TarWriter

BUILD_VERSION = 1  # bump when the shard bytes for the same input would change


class BuildError(RuntimeError):
    """A build cannot proceed (nothing usable, bad output location, ...)."""


@dataclass
class BuildOptions:
    # height, width; None = the size of the first readable image (in item order), so an
    # arcface 112x112 set stays 112x112; images of another size are resized to it.
    image_size: tuple[int, int] | None = None
    channels: int = 3
    quality: int = 95  # JPEG quality when an image must be re-encoded
    max_samples: int = 10_000  # per shard
    max_bytes: int = 1_000_000_000  # per shard (estimated from the source sizes)
    workers: int = 1  # shard-writing processes
    seed: int = 0  # item order across shards
    endpoint_url: str = ""
    part_size: int = 64 << 20  # multipart part size for S3 uploads
    progress: bool = True


@dataclass
class BuildReport:
    out_url: str
    manifest: Manifest
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        m = self.manifest
        lines = [f"{self.out_url}: {m.kind} set, {m.num_classes} classes, {m.num_samples} samples "
                 f"in {len(m.shards)} shards ({len(self.written)} written, "
                 f"{len(self.reused)} unchanged)"]
        if self.problems:
            lines.append(f"skipped {len(self.problems)} inputs (listed in {REPORT_NAME}):")
            lines += [f"  {p.source}: {p.reason}" for p in self.problems[:20]]
            if len(self.problems) > 20:
                lines.append(f"  ... and {len(self.problems) - 20} more")
        return "\n".join(lines)


def shard_prefix(kind: str) -> str:
    return "ids" if kind == "identity" else "seqs"


# --------------------------------------------------------------------------- one shard


class ShardFile:
    """A shard being written: a scratch tar that becomes ``out_url/name`` on finish()."""

    def __init__(self, out_url: str, name: str, shard_index: int, kind: str, endpoint_url: str = "",
                 part_size: int = 64 << 20):
        self.out_url, self.name, self.shard_index, self.kind = out_url, name, shard_index, kind
        self.endpoint_url, self.part_size = endpoint_url, part_size
        fd, self.tmp = tempfile.mkstemp(dir=store.scratch_dir(out_url), prefix=f".{name}.",
                                        suffix=".partial")
        self._f = os.fdopen(fd, "wb")
        self._tar = TarWriter(self._f)
        self.count = 0

    def add(self, jpg: bytes, index: int, source: str) -> None:
        key = f"{self.shard_index:06d}_{self.count:06d}"
        meta = {"kind": self.kind, "index": index, "source": source}
        self._tar.add(f"{key}.jpg", jpg)
        self._tar.add(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        self.count += 1

    def finish(self, fingerprint: str = "", skipped: list[list[str]] | None = None) -> ShardEntry:
        self._tar.close()
        self._f.close()
        h = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        nbytes = os.path.getsize(self.tmp)
        store.put_file(self.tmp, store.join(self.out_url, self.name), self.endpoint_url,
                       part_size=self.part_size)
        return ShardEntry(self.name, self.count, h.hexdigest(), nbytes, fingerprint, skipped or [])

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _write_shard(job: dict) -> ShardEntry:
    """Process-pool task: read, check and (if needed) re-encode each image; write the shard."""
    shard = ShardFile(job["out_url"], job["name"], job["shard_index"], job["kind"],
                      job["endpoint_url"], job["part_size"])
    skipped: list[list[str]] = []
    try:
        for item, index in job["items"]:
            try:
                jpg = images.prepare_for_shard(read_item_bytes(item), job["image_size"],
                                               job["channels"], job["quality"])
            except (OSError, ValueError) as e:  # ImageError and RecordIOError are ValueErrors
                skipped.append([item.source, str(e)])
                continue
            shard.add(jpg, index, item.source)
        return shard.finish(job["fingerprint"], skipped)
    except BaseException:
        shard.abort()
        raise


# --------------------------------------------------------------------------- planning


def _fingerprint(kind: str, opts: BuildOptions, members: list[tuple[Item, int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([BUILD_VERSION, kind, list(opts.image_size), opts.channels,
                         opts.quality]).encode())
    for item, index in members:
        h.update(f"\n{index}\t{item.source}\t{item.stamp}".encode())
    return h.hexdigest()[:32]


def _plan(items: list[Item], label_map: dict[str, int],
          opts: BuildOptions) -> list[list[tuple[Item, int]]]:
    ordered = sorted(items, key=lambda it: (label_map[it.label], it.source))
    random.Random(opts.seed).shuffle(ordered)
    shards: list[list[tuple[Item, int]]] = [[]]
    nbytes = 0
    for it in ordered:
        cur = shards[-1]
        if cur and (len(cur) >= opts.max_samples or nbytes + it.size > opts.max_bytes):
            shards.append([])
            nbytes = 0
        shards[-1].append((it, label_map[it.label]))
        nbytes += it.size + 1536  # tar headers and the json member
    return shards


def _previous_entries(out_url: str, endpoint_url: str) -> dict[str, ShardEntry]:
    """Shards a previous (possibly interrupted) build finished, by name. A listed name
    that is not one this builder writes is refused (BuildError): the build deletes the
    shards it no longer lists, and must never reach outside ``out_url``."""
    found: dict[str, ShardEntry] = {}
    man_url = store.join(out_url, MANIFEST_NAME)
    try:
        for s in load_manifest(man_url, endpoint_url).shards:
            found[check_shard_name(s.name, man_url, built=True)] = s
    except ShardNameError as e:
        raise BuildError(str(e)) from None
    except ManifestError:
        pass
    part_url = store.join(out_url, PARTIAL_NAME)
    try:
        partial = json.loads(store.read_bytes(part_url, endpoint_url))
        listed = [ShardEntry(**s) for s in partial.get("shards", [])]
    except Exception:  # noqa: BLE001 - no partial state, or an unreadable one: start over
        return found
    try:
        for s in listed:
            found[check_shard_name(s.name, part_url, built=True)] = s
    except ShardNameError as e:
        raise BuildError(str(e)) from None
    return found


def _write_if_changed(url: str, data: bytes, endpoint_url: str) -> bool:
    try:
        if store.read_bytes(url, endpoint_url) == data:
            return False
    except Exception:  # noqa: BLE001 - absent: write it
        pass
    store.write_bytes(url, data, endpoint_url)
    return True


def _first_image_size(items: list[Item]) -> tuple[int, int]:
    """(height, width) of the first item whose header reads; (112, 112) if none does
    (the build then reports every item as unreadable)."""
    for item in items:
        try:
            with Image.open(io.BytesIO(read_item_bytes(item))) as im:
                return im.size[1], im.size[0]
        except Exception:  # noqa: BLE001 - unreadable items are reported by the workers
            continue
    return 112, 112


def build_shards(items: list[Item], problems: list[Problem], out_url: str, kind: str,
                 opts: BuildOptions, source_info: dict, source_type: str = "tree") -> BuildReport:
    """Write the shard set for already-listed items (the builders below call this)."""
    if kind not in KINDS:
        raise BuildError(f"kind must be identity or sequence, not {kind!r}")
    if opts.image_size is None:
        opts = replace(opts, image_size=_first_image_size(items))
    previous = _previous_entries(out_url, opts.endpoint_url)
    problems = list(problems)
    listed = set(previous)  # every shard name this build may have to clean up
    while True:
        if not items:
            raise BuildError(f"{source_info.get('root', out_url)}: no usable images "
                             f"({len(problems)} inputs skipped)")
        names = sorted({it.label for it in items}, key=label_sort_key(source_type))
        label_map = {n: i for i, n in enumerate(names)}
        report = _write_pass(items, label_map, problems, out_url, kind, opts, previous,
                             source_info)
        listed |= {e.name for e in report.manifest.shards}
        empty = _labels_without_samples(items, report.manifest)
        if not empty:
            break
        # Every image of these failed to decode: a label with no samples would be a class
        # the model can never see. Drop them and write again, so the indices stay
        # contiguous (shards whose contents do not change are reused).
        problems += _dropped_problems(items, report.manifest, empty, kind)
        items = [it for it in items if it.label not in empty]
        previous = {**previous, **{e.name: e for e in report.manifest.shards}}
    _finish(report, out_url, opts, listed)
    return report


def _dropped_problems(items: list[Item], manifest: Manifest, empty: set[str],
                      kind: str) -> list[Problem]:
    """The failed images of the dropped labels (their shards no longer list them), and
    one line per dropped label."""
    label_of = {it.source: it.label for it in items}
    out = [Problem(src, reason) for e in manifest.shards for src, reason in e.skipped
           if label_of.get(src) in empty]
    word = "identity" if kind == "identity" else "sequence"
    for label in sorted(empty):
        n = sum(it.label == label for it in items)
        out.append(Problem(label, f"{word} dropped from the label map: all {n} of its "
                                  f"images failed"))
    return out


def _finish(report: BuildReport, out_url: str, opts: BuildOptions, listed: set[str]) -> None:
    """Write the manifest and the report, then remove what the set no longer lists."""
    manifest = report.manifest
    for e in manifest.shards:
        report.problems += [Problem(src, reason) for src, reason in e.skipped]
    _write_if_changed(store.join(out_url, MANIFEST_NAME), manifest.to_json(), opts.endpoint_url)
    body = json.dumps({"skipped": [p.to_list() for p in report.problems]}, indent=1).encode()
    _write_if_changed(store.join(out_url, REPORT_NAME), body, opts.endpoint_url)
    if store.size(store.join(out_url, PARTIAL_NAME), opts.endpoint_url) is not None:
        store.delete(store.join(out_url, PARTIAL_NAME), opts.endpoint_url)
    # Shards of an older, larger build (or of a pass with more labels) are no longer
    # listed: remove them. Every name was checked to be one this builder writes.
    prefix = shard_prefix(manifest.kind) + "-"
    for name in sorted(listed - {e.name for e in manifest.shards}):
        if name.startswith(prefix) and check_shard_name(name, out_url, built=True):
            store.delete(store.join(out_url, name), opts.endpoint_url)


def _labels_without_samples(items: list[Item], manifest: Manifest) -> set[str]:
    failed = {src for e in manifest.shards for src, _ in e.skipped}
    return {it.label for it in items} - {it.label for it in items if it.source not in failed}


def _write_pass(items: list[Item], label_map: dict[str, int], problems: list[Problem],
                out_url: str, kind: str, opts: BuildOptions, previous: dict[str, ShardEntry],
                source_info: dict) -> BuildReport:
    """Write (or reuse) the shards of one labelling; the report holds the manifest."""
    plan = _plan(items, label_map, opts)
    prefix = shard_prefix(kind)
    entries: dict[str, ShardEntry] = {}
    report = BuildReport(out_url, None, problems=list(problems))  # type: ignore[arg-type]
    jobs = []
    for k, members in enumerate(plan):
        name = f"{prefix}-{k:06d}.tar"
        fp = _fingerprint(kind, opts, members)
        old = previous.get(name)
        if old and old.fingerprint == fp and store.size(store.join(out_url, name),
                                                        opts.endpoint_url) == old.bytes:
            entries[name] = old
            report.reused.append(name)
            continue
        jobs.append({"out_url": out_url, "name": name, "shard_index": k, "kind": kind,
                     "items": members, "image_size": tuple(opts.image_size),
                     "channels": opts.channels, "quality": opts.quality,
                     "endpoint_url": opts.endpoint_url, "part_size": opts.part_size,
                     "fingerprint": fp})
    _run_jobs(jobs, entries, report, out_url, opts)
    report.manifest = Manifest(kind, len(label_map), list(opts.image_size), opts.channels,
                               [entries[n] for n in sorted(entries)], label_map,
                               dict(source_info), opts.seed)
    return report


def _run_jobs(jobs: list[dict], entries: dict[str, ShardEntry], report: BuildReport,
              out_url: str, opts: BuildOptions) -> None:
    from tqdm import tqdm

    def done(entry: ShardEntry) -> None:
        entries[entry.name] = entry
        report.written.append(entry.name)
        # Record progress so an interrupted build resumes from here.
        state = {"shards": [vars(entries[n]) for n in sorted(entries)]}
        store.write_bytes(store.join(out_url, PARTIAL_NAME), json.dumps(state).encode(),
                          opts.endpoint_url)

    bar = tqdm(total=len(jobs), unit="shard", desc=f"building {out_url}",
               disable=not opts.progress or not jobs)
    try:
        if opts.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                done(_write_shard(job))
                bar.update(1)
            return
        # spawn, not fork: the parent may hold threads (uploads, servers) and locks.
        with ProcessPoolExecutor(max_workers=opts.workers, mp_context=get_context("spawn")) as ex:
            futures = [ex.submit(_write_shard, job) for job in jobs]
            for fut in as_completed(futures):
                done(fut.result())
                bar.update(1)
    finally:
        bar.close()


# --------------------------------------------------------------------------- entry points


def build_identity_tree(root: str, out_url: str, opts: BuildOptions | None = None) -> BuildReport:
    """``ROOT/<identity>/<image>`` -> identity shard set at ``out_url``."""
    opts = opts or BuildOptions()
    items, problems = scan_tree(root, "identity")
    return build_shards(items, problems, out_url, "identity", opts,
                        {"type": "identity-tree", "root": os.path.abspath(root)})


def build_sequence_tree(root: str, out_url: str, opts: BuildOptions | None = None) -> BuildReport:
    """``ROOT/<track>/<frame>`` or ``ROOT/<video>/<track>/<frame>`` -> sequence shard set."""
    opts = opts or BuildOptions()
    items, problems = scan_tree(root, "sequence")
    return build_shards(items, problems, out_url, "sequence", opts,
                        {"type": "sequence-tree", "root": os.path.abspath(root)})


def build_recordio(rec_path: str, out_url: str, opts: BuildOptions | None = None, *,
                   kind: str = "identity", idx_path: str | None = None,
                   lst_path: str | None = None) -> BuildReport:
    """``.rec`` (+ ``.idx``/``.lst``) -> shard set; labels sorted numerically, so a
    contiguous 0..N-1 labelling keeps its indices."""
    opts = opts or BuildOptions()
    items, problems = scan_recordio(rec_path, idx_path, lst_path)
    return build_shards(items, problems, out_url, kind, opts,
                        {"type": "recordio", "root": os.path.abspath(rec_path)}, "recordio")


# --------------------------------------------------------------------------- from memory


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == channels:
        return arr
    if channels == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 1 and arr.shape[2] == 3:
        gray = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
    raise BuildError(f"cannot convert an image of shape {arr.shape} to {channels} channels")


def write_shard_set(samples: Iterable[tuple], out_url: str, kind: str, *,
                    num_classes: int | None = None, image_size: tuple[int, int] | None = None,
                    channels: int | None = None, label_names: list[str] | None = None,
                    max_samples: int = 10_000, max_bytes: int = 1_000_000_000,
                    quality: int = 95, endpoint_url: str = "") -> Manifest:
    """Write a shard set from arrays: ``samples`` yields ``(index, uint8 array)`` or
    ``(index, array, source)`` with arrays H x W or H x W x C.

    ``index`` is the identity (kind "identity") or sequence (kind "sequence") index, in
    ``0..num_classes-1`` (default: the largest index + 1). ``image_size``/``channels``
    default to the first array's; other sizes are resized. The label map names class i
    ``label_names[i]`` (default ``str(i)`` zero-padded, so sorted names keep the order).
    Not resumable: it rewrites the whole set.
    """
    if kind not in KINDS:
        raise BuildError(f"kind must be identity or sequence, not {kind!r}")
    prefix = shard_prefix(kind)
    entries: list[ShardEntry] = []
    shard: ShardFile | None = None
    nbytes, max_index, n = 0, -1, 0
    try:
        for n, sample in enumerate(samples):
            index, arr = int(sample[0]), np.asarray(sample[1])
            source = str(sample[2]) if len(sample) > 2 else f"memory#{n}"
            if index < 0 or (num_classes is not None and index >= num_classes):
                raise BuildError(f"sample {n} ({source}): index {index} outside 0..{num_classes}")
            if image_size is None:
                image_size = (int(arr.shape[0]), int(arr.shape[1]))
                channels = channels or (1 if arr.ndim == 2 else int(arr.shape[2]))
            channels = channels or 3
            arr = _to_channels(arr.astype(np.uint8, copy=False), channels)
            if arr.shape[:2] != tuple(image_size):
                arr = images.resize_array(arr, image_size)
            jpg = images.encode_jpeg(arr, quality)
            if shard is not None and (shard.count >= max_samples or nbytes + len(jpg) > max_bytes):
                entries.append(shard.finish())
                shard = None
            if shard is None:
                shard = ShardFile(out_url, f"{prefix}-{len(entries):06d}.tar", len(entries),
                                  kind, endpoint_url)
                nbytes = 0
            shard.add(jpg, index, source)
            nbytes += len(jpg) + 1536
            max_index = max(max_index, index)
        if shard is not None:
            entries.append(shard.finish())
            shard = None
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    if not entries:
        raise BuildError(f"{out_url}: no samples given")
    n_cls = num_classes if num_classes is not None else max_index + 1
    if label_names is not None and len(label_names) != n_cls:
        raise BuildError(f"label_names has {len(label_names)} names for {n_cls} classes")
    width = len(str(max(n_cls - 1, 0)))
    names = label_names or [f"{i:0{width}d}" for i in range(n_cls)]
    manifest = Manifest(kind, n_cls, list(image_size), int(channels), entries,
                        {name: i for i, name in enumerate(names)}, {"type": "memory"}, 0)
    store.write_bytes(store.join(out_url, MANIFEST_NAME), manifest.to_json(), endpoint_url)
    return manifest

"""The manifest of a shard set, and turning a user's URL into a resolved shard set.

``manifest.json`` sits next to the shards. It records the kind (identity | sequence),
the number of classes (``N_id`` or ``N_seq``), image size and channels, per shard its name,
sample count, byte size, sha256 and a build fingerprint (for resumable, idempotent builds),
and the label map (source name -> index, names sorted, so a rebuild gives the same
indices; DESIGN.md §4a).

A shard set is named by any of: the manifest URL (``.../manifest.json``), its folder or
prefix (``s3://bucket/ids``), or a brace pattern of shard URLs
(``s3://bucket/ids/ids-{000000..000009}.tar``), which selects those shards of the
manifest in the pattern's folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import braceexpand

from seqface_dist.data import store

FORMAT = "seqface-shards/1"
MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = "manifest.partial.json"
REPORT_NAME = "build_report.json"
KINDS = ("identity", "sequence")


class ManifestError(ValueError):
    """A manifest is missing, malformed or does not match its shards."""


class ShardNameError(ManifestError):
    """A manifest lists a shard name that is not a plain file name of its folder."""


# A shard name read from storage is joined to the set's folder: it must be one plain file
# name there (no "/", "\\", "..", leading dot, control characters), or a manifest could
# point a reader, or a build's clean-up, at any file. The builders write
# "ids-000000.tar" / "seqs-000000.tar" (BUILT_NAME); readers also take other plain names.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.tar")
BUILT_NAME = re.compile(r"(ids|seqs)-[0-9]{6,}\.tar")


def check_shard_name(name: object, where: str, built: bool = False) -> str:
    """``name`` if it is a plain shard file name (``built``: one the builder writes),
    else a ManifestError naming ``where`` and the entry."""
    rule = BUILT_NAME if built else SHARD_NAME
    if not isinstance(name, str) or not rule.fullmatch(name):
        raise ShardNameError(f"{where}: shard name {name!r} is not a plain shard file name "
                             f"(must match {rule.pattern}); refusing the manifest")
    return name


@dataclass
class ShardEntry:
    name: str
    count: int
    sha256: str
    bytes: int
    fingerprint: str = ""
    skipped: list[list[str]] = field(default_factory=list)  # [source, reason] at build time


@dataclass
class Manifest:
    kind: str
    num_classes: int
    image_size: list[int]  # [height, width]
    channels: int
    shards: list[ShardEntry]
    label_map: dict[str, int]
    source: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> bytes:
        d = {
            "format": FORMAT,
            "kind": self.kind,
            "N_id" if self.kind == "identity" else "N_seq": self.num_classes,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "image_size": list(self.image_size),
            "channels": self.channels,
            "seed": self.seed,
            "source": self.source,
            "shards": [vars(s) for s in self.shards],
            "label_map": self.label_map,
        }
        return (json.dumps(d, indent=1, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT:
                raise ManifestError(f"{where}: not a {FORMAT} manifest "
                                    f"(format {d.get('format')!r})")
            if d["kind"] not in KINDS:
                raise ManifestError(f"{where}: kind must be identity or sequence, "
                                    f"not {d['kind']!r}")
            shards = [ShardEntry(**s) for s in d["shards"]]
            for s in shards:
                check_shard_name(s.name, where)
            m = cls(d["kind"], int(d["num_classes"]), [int(x) for x in d["image_size"]],
                    int(d["channels"]), shards, {str(k): int(v) for k, v in d["label_map"].items()},
                    d.get("source", {}), int(d.get("seed", 0)))
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if len(m.label_map) != m.num_classes or (
                m.label_map and sorted(m.label_map.values()) != list(range(m.num_classes))):
            raise ManifestError(f"{where}: the label map does not hold indices "
                                f"0..{m.num_classes - 1}")
        return m


def load_manifest(url: str, endpoint_url: str = "") -> Manifest:
    try:
        data = store.read_bytes(url, endpoint_url)
    except FileNotFoundError:
        raise ManifestError(f"{url}: no manifest there") from None
    except Exception as e:
        raise ManifestError(f"{url}: cannot read the manifest ({type(e).__name__}: {e})") from None
    return Manifest.from_json(data, url)


@dataclass
class ShardSet:
    """A resolved shard set: the manifest and the shard URLs (with counts) to read."""

    url: str  # the manifest's URL
    manifest: Manifest
    shards: list[tuple[str, int]]

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def num_samples(self) -> int:
        return sum(c for _, c in self.shards)


def resolve_shard_set(spec: str, endpoint_url: str = "") -> ShardSet:
    """A manifest URL, a folder/prefix or a brace pattern -> ShardSet."""
    if spec.endswith(".json"):
        man_url, wanted = spec, None
    elif "{" in spec or spec.endswith(".tar"):
        wanted = list(braceexpand.braceexpand(spec))
        folders = {store.dirname(u) for u in wanted}
        if len(folders) != 1:
            raise ManifestError(f"{spec}: a pattern must name shards of one folder")
        man_url = store.join(folders.pop(), MANIFEST_NAME)
    else:
        man_url, wanted = store.join(spec, MANIFEST_NAME), None
    m = load_manifest(man_url, endpoint_url)
    base = store.dirname(man_url)
    by_url = {store.join(base, s.name): s.count for s in m.shards}
    if wanted is None:
        shards = list(by_url.items())
    else:
        missing = [u for u in wanted if u not in by_url]
        if missing:
            raise ManifestError(f"{spec}: {missing[0]} is not listed in {man_url}")
        shards = [(u, by_url[u]) for u in wanted]
    return ShardSet(man_url, m, shards)

"""Re-read a shard set and check it against its manifest (``seqface shards verify``).

Shards are read with webdataset's own tar pipeline (``tar_file_iterator`` +
``group_by_keys``), so a set that verifies is one plain WebDataset reads; training keeps
the project's reader, measured faster and more robust (bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from seqface_dist.data import store
from seqface_dist.data.manifest import ShardSet, resolve_shard_set


@dataclass
class VerifyResult:
    shard_set: ShardSet
    checked: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class _Hashing:
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.n += len(data)
        return data


def _check_samples(f, url: str, ss: ShardSet, problems: list[str]) -> int:
    """Read one shard through webdataset's own tar pipeline (the reader a user of plain
    WebDataset has) and count its good samples; what is wrong goes to ``problems``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def note(ex: Exception) -> bool:
        problems.append(f"{type(ex).__name__}: {ex.args[0] if ex.args else ''}")
        return True  # keep reading past a bad member; a broken stream ends by itself

    n = 0
    stream = tar_file_expander([{"url": url, "stream": f}], handler=note, eof_value=None)
    for sample in group_by_keys(stream, handler=note):
        key = sample["__key__"]
        if "jpg" not in sample or "json" not in sample:
            problems.append(f"sample {key} lacks jpg or json")
            continue
        try:
            meta = json.loads(sample["json"])
            ok = meta["kind"] == ss.kind and 0 <= meta["index"] < ss.num_classes
        except Exception:  # noqa: BLE001 - reported below
            ok = False
        if not ok:
            problems.append(f"sample {key}: bad json")
            continue
        n += 1
    return n


def verify_shard_set(spec: str, endpoint_url: str = "", progress: bool = False) -> VerifyResult:
    """Check every listed shard: present, byte size, sha256, sample count, tar structure,
    json kind and index range. Errors name the shard and what differs."""
    from tqdm import tqdm

    ss = resolve_shard_set(spec, endpoint_url)
    res = VerifyResult(ss)
    entries = {store.join(store.dirname(ss.url), e.name): e for e in ss.manifest.shards}
    for url, _count in tqdm(ss.shards, unit="shard", desc="verifying", disable=not progress):
        e = entries[url]
        res.checked += 1
        problems: list[str] = []
        try:
            with store.open_read(url, endpoint_url) as f:
                hf = _Hashing(f)
                n = _check_samples(hf, url, ss, problems)
                while hf.read(1 << 20):  # hash the tail (end-of-archive padding)
                    pass
        except Exception as ex:  # noqa: BLE001 - a missing or unreadable shard is an error
            res.errors.append(f"{url}: cannot read ({type(ex).__name__}: {ex})")
            continue
        res.samples += n
        if n != e.count:
            problems.append(f"{n} samples, manifest says {e.count}")
        if hf.n != e.bytes:
            problems.append(f"{hf.n} bytes, manifest says {e.bytes}")
        if hf.h.hexdigest() != e.sha256:
            problems.append("sha256 differs from the manifest")
        res.errors += [f"{url}: {p}" for p in problems]
    return res

"""Where each shard set's class indices land among the head's rows (DESIGN.md §4a).

Identity sets are laid end to end from row 0, sequence sets from row 0 of the sequence
rows (the loader adds N_id). Each set also carries the digest of its label map, so a
checkpoint knows which people its rows are (a resume onto other data is refused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from seqface_dist.data.manifest import ShardSet, resolve_shard_set


@dataclass
class LabelLayout:
    """Where each shard set's indices land among the centers (DESIGN.md §4a)."""

    num_identities: int = 0
    num_sequences: int = 0
    identity_sets: list[dict] = field(default_factory=list)  # {url, offset, num_classes, ...}
    sequence_sets: list[dict] = field(default_factory=list)  # offset counts from 0 (add N_id)

    def to_dict(self) -> dict:
        return {"num_identities": self.num_identities, "num_sequences": self.num_sequences,
                "identity_sets": self.identity_sets, "sequence_sets": self.sequence_sets}


def resolve_sets(specs: list[str], kind: str, endpoint_url: str = "") -> list[ShardSet]:
    sets = [resolve_shard_set(s, endpoint_url) for s in specs]
    for spec, s in zip(specs, sets, strict=True):
        if s.kind != kind:
            raise ValueError(f"{spec}: a {s.kind} shard set listed among the {kind} shards")
    return sets


def label_digest(label_map: dict[str, int]) -> str:
    """sha256 of a set's label map (class name -> index): which people the rows are."""
    canon = json.dumps(sorted(label_map.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def make_layout(id_sets: list[ShardSet], seq_sets: list[ShardSet]) -> LabelLayout:
    lay = LabelLayout()
    for s in id_sets:
        lay.identity_sets.append({"url": s.url, "offset": lay.num_identities,
                                  "num_classes": s.num_classes, "num_samples": s.num_samples,
                                  "label_digest": label_digest(s.manifest.label_map)})
        lay.num_identities += s.num_classes
    for s in seq_sets:
        lay.sequence_sets.append({"url": s.url, "offset": lay.num_sequences,
                                  "num_classes": s.num_classes, "num_samples": s.num_samples,
                                  "label_digest": label_digest(s.manifest.label_map)})
        lay.num_sequences += s.num_classes
    return lay

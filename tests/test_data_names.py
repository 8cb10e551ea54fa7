"""Names from storage are validated; the builder never reaches outside its output folder
and never keeps a label without samples."""

from __future__ import annotations

import json
import os

import pytest
from test_data_build import SIZE, save_jpeg, shard_samples, smooth_image

from seqface_dist.data.build import (
    BuildError,
    BuildOptions,
    build_identity_tree,
    build_sequence_tree,
)
from seqface_dist.data.cli import register
from seqface_dist.data.manifest import (
    MANIFEST_NAME,
    PARTIAL_NAME,
    ManifestError,
    load_manifest,
    resolve_shard_set,
)

OPTS = BuildOptions(image_size=SIZE, max_samples=4, progress=False)


def tree(root, labels: dict[str, int], broken: dict[str, int] | None = None) -> str:
    """``labels[name]`` good images per folder, ``broken[name]`` undecodable ones."""
    n = 0
    for name, k in labels.items():
        for j in range(k):
            save_jpeg(str(root / name / f"{j:03d}.jpg"), smooth_image(n, *SIZE))
            n += 1
    for name, k in (broken or {}).items():
        os.makedirs(root / name, exist_ok=True)
        for j in range(k):
            (root / name / f"bad{j}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return str(root)


def cli_build(src: str, out: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shards", "build", "identity-tree", src, out, "--image-size",
                              f"{SIZE[0]}x{SIZE[1]}", "--max-samples", "4", "--no-progress"])
    return args.handler(args)


def test_build_refuses_a_partial_manifest_that_names_a_file_outside(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    src = tree(tmp_path / "src", {"a": 3, "b": 3})
    out = tmp_path / "sets" / "out"
    out.mkdir(parents=True)
    bad = {"name": "ids-/../../victim.txt", "count": 1, "sha256": "", "bytes": 7}
    (out / PARTIAL_NAME).write_text(json.dumps({"shards": [bad]}))
    with pytest.raises(BuildError, match=r"manifest\.partial\.json.*ids-/\.\./\.\./victim\.txt"):
        build_identity_tree(src, str(out), OPTS)
    assert victim.read_text() == "keep me"
    # The command line says so and fails; nothing was written, the victim is still there.
    assert cli_build(src, str(out)) == 1
    assert "ids-/../../victim.txt" in capsys.readouterr().err
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL_NAME]


def test_build_refuses_a_manifest_with_a_name_it_never_writes(tmp_path):
    src = tree(tmp_path / "src", {"a": 3})
    out = tmp_path / "out"
    build_identity_tree(src, str(out), OPTS)
    man = json.loads((out / MANIFEST_NAME).read_text())
    man["shards"][0]["name"] = "other.tar"  # a plain name, but not one the builder writes
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    (out / "other.tar").write_text("a user's file")
    with pytest.raises(BuildError, match=r"manifest\.json.*'other\.tar'"):
        build_identity_tree(src, str(out), OPTS)
    assert (out / "other.tar").read_text() == "a user's file"


@pytest.mark.parametrize("name", ["../ids-000000.tar", "ids/../../x.tar", "/etc/passwd.tar",
                                  "..", ".hidden.tar", "a\\..\\b.tar", "ids-000000.tar\n",
                                  "", 7])
def test_a_reader_refuses_a_manifest_with_a_traversing_name(tmp_path, name):
    src = tree(tmp_path / "src", {"a": 3})
    out = tmp_path / "out"
    build_identity_tree(src, str(out), OPTS)
    man = json.loads((out / MANIFEST_NAME).read_text())
    man["shards"][0]["name"] = name
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(ManifestError, match=r"manifest\.json: shard name") as e:
        resolve_shard_set(str(out))
    assert repr(name) in str(e.value)


def test_an_identity_whose_images_all_fail_is_dropped_and_labels_stay_contiguous(tmp_path):
    src = tree(tmp_path / "src", {"alice": 3, "carol": 3, "dave": 2}, broken={"bob": 3})
    out = tmp_path / "out"
    rep = build_identity_tree(src, str(out), OPTS)
    m = load_manifest(str(out / MANIFEST_NAME))
    assert m.label_map == {"alice": 0, "carol": 1, "dave": 2} and m.num_classes == 3
    # Every class has samples, and every sample's index is a class of the map.
    seen = [meta["index"] for s in m.shards for _, _, meta in shard_samples(str(out / s.name))]
    assert sorted(set(seen)) == [0, 1, 2] and len(seen) == 8 == m.num_samples
    dropped = [p for p in rep.problems if "dropped from the label map" in p.reason]
    assert [p.source for p in dropped] == ["bob"]
    assert {p.source for p in rep.problems} >= {"bob/bad0.jpg", "bob/bad1.jpg", "bob/bad2.jpg"}
    report = json.loads((out / "build_report.json").read_text())
    assert ["bob", dropped[0].reason] in report["skipped"]
    # Only shards the manifest lists are left (the first pass had as many; none leaks).
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s.name for s in m.shards)
    # A rebuild of the same source gives the same set (it writes the shards again: the
    # first pass does not know the label will be dropped).
    again = build_identity_tree(src, str(out), OPTS)
    assert again.manifest.to_json() == m.to_json()


def test_a_track_whose_frames_all_fail_is_dropped(tmp_path):
    src = tree(tmp_path / "src", {"v1/t1": 2, "v1/t3": 2}, broken={"v1/t2": 2})
    rep = build_sequence_tree(src, str(tmp_path / "out"), OPTS)
    assert rep.manifest.label_map == {"v1/t1": 0, "v1/t3": 1}
    assert any(p.source == "v1/t2" and "dropped" in p.reason for p in rep.problems)


def test_a_source_whose_images_all_fail_is_an_error(tmp_path):
    src = tree(tmp_path / "src", {}, broken={"a": 2, "b": 1})
    with pytest.raises(BuildError, match="no usable images"):
        build_identity_tree(src, str(tmp_path / "out"), OPTS)

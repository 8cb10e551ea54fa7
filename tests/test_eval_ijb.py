"""IJB-style template verification (seqface_dist.eval.ijb): media pooling against a hand
computation, TAR@FAR against a brute-force search, and `seqface eval ijb` end to end on a
generated protocol with an exported tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqface_dist.cli import main
from seqface_dist.eval.ijb import (
    IJB_FARS,
    evaluate_ijb,
    meta_paths,
    read_protocol,
    template_features,
    template_scores,
)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_media_pooling_matches_hand_computation():
    # Template 7: media 1 holds two frames, media 2 one still. Template 3: one media of
    # three frames. Rows deliberately interleaved and of different norms.
    feats = np.array([[3.0, 4.0, 0.0],    # t7 m1
                      [0.0, 0.0, 2.0],    # t3 m5
                      [0.0, 10.0, 0.0],   # t7 m2
                      [1.0, 0.0, 0.0],    # t7 m1
                      [0.0, 5.0, 5.0],    # t3 m5
                      [2.0, 2.0, 1.0]])   # t3 m5
    templates = np.array([7, 3, 7, 7, 3, 3])
    medias = np.array([1, 5, 2, 1, 5, 5])
    tids, tf = template_features(feats, templates, medias)
    assert tids.tolist() == [3, 7]
    # By hand: normalise each image; average within a media; average the media; normalise.
    m1 = (np.array([0.6, 0.8, 0.0]) + np.array([1.0, 0.0, 0.0])) / 2
    m2 = np.array([0.0, 1.0, 0.0])
    t7 = _unit((m1 + m2) / 2)   # two media weigh equally (not 2 frames : 1 still)
    t3 = _unit((np.array([0, 0, 1.0]) + _unit([0, 5, 5]) + np.array([2, 2, 1]) / 3) / 3)
    np.testing.assert_allclose(tf, np.stack([t3, t7]), atol=1e-12)
    # Not the plain mean over images (which would weigh the 2-frame media double).
    rows = feats[[0, 2, 3]] / np.linalg.norm(feats[[0, 2, 3]], axis=1, keepdims=True)
    assert not np.allclose(tf[1], _unit(rows.mean(0)))
    s = template_scores(tids, tf, np.array([7, 3, 7]), np.array([3, 3, 7]))
    np.testing.assert_allclose(s, [t7 @ t3, 1.0, 1.0], atol=1e-12)
    with pytest.raises(KeyError, match="template 9"):
        template_scores(tids, tf, np.array([9]), np.array([3]))


def _brute_tar_at_far(scores, label, far):
    """Largest TAR over every threshold (accept iff score > t) whose FAR <= far."""
    imp, gen = scores[~label], scores[label]
    best = 0.0
    for t in np.concatenate([[-np.inf], np.unique(scores)]):
        if np.mean(imp > t) <= far + 1e-12:
            best = max(best, float(np.mean(gen > t)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    label = rng.random(1500) < 0.1
    scores = np.where(label, rng.normal(0.6, 0.2, label.size),
                      rng.normal(0.0, 0.2, label.size))
    scores = np.round(scores, 2)  # ties, as real cosines at low precision have
    fars = (1e-3, 1e-2, 1e-1, 0.5)
    res = evaluate_ijb(scores, label, fars)
    for t, far in zip(res.tar_at_far, fars, strict=True):
        assert t.tar == pytest.approx(_brute_tar_at_far(scores, label, far)), far
        assert t.far <= far
    # FARs below 1/impostors are measured at FAR 0 and flagged in the table.
    res = evaluate_ijb(scores, label, IJB_FARS)
    assert [t.resolvable for t in res.tar_at_far] == [False, False, False, True, True, True]
    assert "measured at FAR=0" in res.table()
    assert res.tar_at_far[0].tar == pytest.approx(_brute_tar_at_far(scores, label, 0.0))


def test_protocol_files_are_checked(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "ijbb_face_tid_mid.txt").write_text("1.jpg 1 10\n2.jpg 2 20\n")
    (meta / "ijbb_template_pair_label.txt").write_text("1 2 0\n1 3 1\n")
    tid_mid, pairs, crops = meta_paths(tmp_path, "IJBB")
    assert crops == tmp_path / "loose_crop"
    with pytest.raises(ValueError, match="template 3 has no images"):
        read_protocol(tid_mid, pairs)
    (meta / "ijbb_template_pair_label.txt").write_text("1 2 2\n")
    with pytest.raises(ValueError, match="0 or 1"):
        read_protocol(tid_mid, pairs)
    (meta / "ijbb_template_pair_label.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match=r":1: expected"):
        read_protocol(tid_mid, pairs)


def _generate_ijb(root: Path, n_ids: int = 6, size: int = 16) -> Path:
    """insightface's layout: each identity a random prototype image; two templates each,
    of a 'video' media (3 noisy frames) and a still; every template pair listed."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    rows, tid, mid = [], 0, 100
    owner = {}
    for i in range(n_ids):
        proto = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
        for _ in range(2):
            tid += 1
            owner[tid] = i
            for frames in (3, 1):
                mid += 1
                for f in range(frames):
                    img = np.clip(proto + rng.normal(0, 12, proto.shape), 0, 255)
                    name = f"{tid}_{mid}_{f}.png"
                    Image.fromarray(img.astype(np.uint8)).save(root / "loose_crop" / name)
                    rows.append(f"{name} {tid} {mid}")
    (root / "meta" / "ijbb_face_tid_mid.txt").write_text("\n".join(rows) + "\n")
    pairs = [f"{a} {b} {int(owner[a] == owner[b])}" for a in owner for b in owner if a < b]
    (root / "meta" / "ijbb_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root


def test_cli_ijb_end_to_end_on_a_generated_protocol(tmp_path, capsys):
    from seqface_dist.config import ModelConfig
    from seqface_dist.eval.embed import embed_images, load_model
    from seqface_dist.models import build_backbone
    from seqface_dist.train.export import export_embedding

    root = _generate_ijb(tmp_path / "IJBB")
    cfg = ModelConfig(backbone="tiny", embedding_dim=16, input_size=[16, 16], in_channels=3)
    torch.manual_seed(0)
    export_embedding(build_backbone(cfg).eval(), cfg, tmp_path / "export")
    out = tmp_path / "out"
    rc = main(["eval", "ijb", "--model", str(tmp_path / "export"), "--root", str(root),
               "--flip", "--no-progress", "--json", str(out / "ijbb.json"),
               "--roc", str(out / "roc.png")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ijbb: 12 templates, 66 pairs (6 genuine, 60 impostor)" in text
    assert "1e-06" in text and "0.1" in text  # the IJB FAR columns
    got = json.loads((out / "ijbb.json").read_text())
    assert [t["far"] for t in got["tar_at_far"]] == list(IJB_FARS)
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"

    # The same numbers by hand: embed with flip, pool per media then template, cosine.
    proto = read_protocol(*meta_paths(root, "ijbb")[:2])
    net = load_model(tmp_path / "export")
    feats = embed_images(net, [root / "loose_crop" / n for n in proto.images], flip=True,
                         progress=False)
    tids, tf = template_features(feats, proto.templates, proto.medias)
    scores = template_scores(tids, tf, proto.t1, proto.t2)
    for t in got["tar_at_far"]:
        assert t["tar"] == pytest.approx(_brute_tar_at_far(scores, proto.label, t["far"]))
    # An untrained net still maps near images near: genuine templates score higher.
    assert scores[proto.label].mean() > scores[~proto.label].mean()
    assert got["auc"] > 0.9

    assert main(["eval", "ijb", "--model", str(tmp_path / "export"),
                 "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere_face_tid_mid.txt" in capsys.readouterr().err  # one line, no traceback

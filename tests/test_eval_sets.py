"""Several evaluation sets in training (eval.sets): the config, loading them from local
paths and S3 (moto's server on loopback), and the preflight that checks them."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from seqface_dist.config import ConfigError, EvalSetConfig, load_config
from seqface_dist.eval.pairs import write_bin
from seqface_dist.eval.sets import check_eval_set, load_eval_set
from seqface_dist.train.driver import PreflightError, _check_eval_sets


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bin(path, n: int = 12, genuine_every: int = 2):
    write_bin(path, [_png(i) for i in range(2 * n)], [i % genuine_every == 0 for i in range(n)])
    return path


def _lfw(tmp_path):
    """An LFW-style pairs.txt (one fold: 6 matched, 6 mismatched) and its image tree."""
    root = tmp_path / "lfw-images"
    for p in range(4):
        (root / f"P{p}").mkdir(parents=True)
        for k in (1, 2, 3):
            (root / f"P{p}" / f"P{p}_{k:04d}.png").write_bytes(_png(10 * p + k))
    lines = ["1 6"]
    lines += [f"P{p % 4}\t{1 + p // 4}\t{2 + p // 4}" for p in range(6)]
    lines += [f"P{p % 4}\t1\tP{(p + 1) % 4}\t3" for p in range(6)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.txt", root


def test_config_sets_shorthand_and_refusals(tmp_path):
    cfg = load_config(None, ["eval.sets=[{name: lfw, path: s3://b/lfw.bin}, "
                             "{name: cfp_fp, path: /d/cfp_fp.bin}]"])
    assert [(s.name, s.path) for s in cfg.eval.resolved_sets()] == [
        ("lfw", "s3://b/lfw.bin"), ("cfp_fp", "/d/cfp_fp.bin")]
    assert cfg.to_dict()["eval"]["sets"][0] == {"name": "lfw", "path": "s3://b/lfw.bin",
                                                "root": ""}
    assert load_config(None, ["eval.pairs=/d/agedb_30.bin"]).eval.resolved_sets() == [
        EvalSetConfig("agedb_30", "/d/agedb_30.bin", "")]
    short = load_config(None, ["eval.pairs=/d/pairs.txt", "eval.root=/d/lfw"]).eval
    assert short.resolved_sets() == [EvalSetConfig("lfw", "/d/pairs.txt", "/d/lfw")]
    assert load_config(None, []).eval.resolved_sets() == []
    for over, key in (
            (["eval.pairs=/a.bin", "eval.sets=[{name: a, path: /b.bin}]"], "eval.pairs"),
            (["eval.sets=[{name: a, path: /a.bin}, {name: a, path: /b.bin}]"],
             r"eval.sets\[1\].name"),
            (["eval.sets=[{name: 'a b', path: /a.bin}]"], r"eval.sets\[0\].name"),
            (["eval.sets=[{name: a, path: /p.txt}]"], r"eval.sets\[0\].root"),
            (["eval.sets=[{name: a}]"], r"eval.sets\[0\].path"),
            (["eval.sets=[{name: a, path: /a.bin, where: x}]"], r"eval.sets\[0\].where"),
            (["eval.sets=[/a.bin]"], r"eval.sets\[0\]"),
            (["eval.root=/r"], "eval.root"),
            (["tracking.mlflow_uri=file:///m", "tracking.mlflow_experiment="],
             "tracking.mlflow_experiment")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, over)


def test_local_sets_load_with_their_names(tmp_path):
    b = load_eval_set(EvalSetConfig("cfp", str(_bin(tmp_path / "x.bin"))))
    assert b.name == "cfp" and len(b) == 12 and len(b.images) == 24
    pairs, root = _lfw(tmp_path)
    p = load_eval_set(EvalSetConfig("lfw", f"file://{pairs}", str(root)))
    assert p.name == "lfw" and len(p) == 12 and int(p.issame.sum()) == 6
    assert check_eval_set(EvalSetConfig("lfw", str(pairs), str(root))).name == "lfw"


def test_s3_sets_load_like_local_ones(tmp_path):
    from seqface_dist.data import store
    from seqface_dist.data.testing import local_s3

    pairs, root = _lfw(tmp_path)
    local_bin = load_eval_set(EvalSetConfig("a", str(_bin(tmp_path / "a.bin"))))
    local_pairs = load_eval_set(EvalSetConfig("l", str(pairs), str(root)))
    with local_s3("bucket") as endpoint:
        store.write_bytes("s3://bucket/eval/a.bin", (tmp_path / "a.bin").read_bytes())
        store.write_bytes("s3://bucket/eval/pairs.txt", pairs.read_bytes())
        for f in root.rglob("*.png"):
            store.write_bytes(f"s3://bucket/eval/lfw/{f.relative_to(root)}", f.read_bytes())
        got_bin = check_eval_set(EvalSetConfig("a", "s3://bucket/eval/a.bin"), endpoint)
        got_pairs = check_eval_set(EvalSetConfig("l", "s3://bucket/eval/pairs.txt",
                                                 "s3://bucket/eval/lfw"))
        with pytest.raises(FileNotFoundError, match="no such object"):
            load_eval_set(EvalSetConfig("x", "s3://bucket/eval/none.bin"))
    assert got_bin.images == local_bin.images
    assert np.array_equal(got_bin.issame, local_bin.issame)
    for got, want in ((got_pairs, local_pairs),):
        assert [got.images[i] for i in got.idx1] == \
            [want.images[i].read_bytes() for i in want.idx1]
        assert [got.images[i] for i in got.idx2] == \
            [want.images[i].read_bytes() for i in want.idx2]
        assert np.array_equal(got.issame, want.issame)
        assert np.array_equal(got.folds, want.folds)


def test_preflight_checks_every_set_before_any_work(tmp_path):
    good = str(_bin(tmp_path / "good.bin"))
    one_kind = str(_bin(tmp_path / "same.bin", genuine_every=1))
    tiny = str(_bin(tmp_path / "tiny.bin", n=4))
    evil = tmp_path / "evil.bin"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    evil.write_bytes(pickle.dumps(([Evil()], [True])))

    def cfg(*paths):
        sets = ", ".join(f"{{name: s{i}, path: '{p}'}}" for i, p in enumerate(paths))
        return load_config(None, [f"eval.sets=[{sets}]"])

    _check_eval_sets(cfg(good, good))
    for bad, why in ((str(tmp_path / "none.bin"), "none.bin"), (one_kind, "genuine and "
                     "impostor"), (tiny, "at least 10"), (str(evil), "system")):
        with pytest.raises(PreflightError, match=rf"eval.sets\[1\] \(s1\): .*{why}"):
            _check_eval_sets(cfg(good, bad))
    assert not marker.exists()
    with pytest.raises(PreflightError, match=r"^eval.pairs: .*none.bin"):
        _check_eval_sets(load_config(None, [f"eval.pairs={tmp_path / 'none.bin'}"]))


def test_plot_draws_every_sets_curves(tmp_path, monkeypatch):
    from seqface_dist.train import plot

    asked: list[str] = []
    real = plot.series
    monkeypatch.setattr(plot, "series", lambda rows, key: (asked.append(key),
                                                           real(rows, key))[1])
    rows = [{"step": s, "total": 1.0 / s, "eval/lfw/accuracy": 0.5 + s / 100,
             "eval/cfp_fp/tar@far=0.001": 0.2, "eval/lfw/auc": 0.9} for s in (2, 4)]
    plot.plot_history(rows, tmp_path / "c.png")
    assert {"eval/lfw/accuracy", "eval/cfp_fp/tar@far=0.001"} <= set(asked)
    assert "eval/lfw/auc" not in asked

"""The paper's experiments run end to end in tiny configurations (so they cannot rot), and
their data plumbing does what it claims: the MNIST allow-list unpickler, the A/B/C split,
the missing-font message."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from experiments import cjk_sensitivity, cjk_table, mnist_2d
from experiments.cjk_table import command_for, split_glyphs
from experiments.glyphs import (
    PRINT_FONTS,
    RESERVED_FROM,
    FontSpec,
    GlyphSet,
    MissingFontsError,
    available_fonts,
    claimed_code_points,
    require_fonts,
)
from seqface_dist.data.mnist import load_mnist

TWO_FONTS_REASON = ("the CJK experiment needs at least 2 of the fonts in experiments.glyphs."
                    "FONTS (a character needs two renders for a genuine pair); install e.g. "
                    "apt-get install -y --no-install-recommends fonts-wqy-zenhei "
                    "fonts-droid-fallback")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_mnist_loader_refuses_a_foreign_global_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump((_Boom(), None, None), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_mnist(path)


def test_mnist_loader_refuses_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    bad = np.array([None, 1], dtype=object)
    with gzip.open(path, "wb") as f:
        pickle.dump(((bad, bad), (bad, bad), (bad, bad)), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="dtype"):
        load_mnist(path)


def test_mnist_loader_reads_plain_arrays(tmp_path: Path) -> None:
    path = tmp_path / "mnist.pkl.gz"
    rng = np.random.default_rng(0)
    parts = tuple((rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n))
                  for n in (5, 3, 2))
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)
    got = load_mnist(path, as_float=True)
    for (x, y), name in zip(parts, ("train", "valid", "test"), strict=True):
        np.testing.assert_array_equal(got[name][0], x.reshape(-1, 28, 28))
        np.testing.assert_array_equal(got[name][1], y)


def test_mnist_2d_end_to_end(tmp_path: Path) -> None:
    report = mnist_2d.main(["--steps", "6", "--limit", "3000", "--tracks-per-digit", "3",
                            "--track-len", "10", "--out", str(tmp_path)])
    assert set(report["runs"]) == set(mnist_2d.RUNS)
    png = (tmp_path / "mnist2d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "mnist2d.json").read_text())
    for run in saved["runs"].values():
        assert 0.0 <= run["digits6to9_accuracy"] <= 1.0
    assert all("dsa_pull" in run["final"] for run in saved["runs"].values())
    assert "lsr" in saved["runs"]["lsr"]["final"]  # sequence samples' chief term
    assert "lsr" not in saved["runs"]["a-only"]["final"]


def test_make_tracks_cuts_one_digit_per_track() -> None:
    y = np.repeat(np.arange(10), 50)
    x = np.arange(len(y), dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    imgs, seq = mnist_2d.make_tracks(x, y, (6, 7), 4, 10, np.random.default_rng(0))
    assert np.bincount(seq).tolist() == [10] * 8
    digit = y[imgs[:, 0, 0].astype(int)]
    for q in range(8):
        assert len(set(digit[seq == q])) == 1
    assert len(set(imgs[:, 0, 0].tolist())) == 80  # no image in two tracks
    with pytest.raises(ValueError, match="digit 6"):
        mnist_2d.make_tracks(x, y, (6,), 6, 10, np.random.default_rng(0))


def _synthetic_glyphs(n_chars: int = 40, n_fonts: int = 6) -> GlyphSet:
    char_of = np.repeat(0x4E00 + np.arange(n_chars), n_fonts)
    font_of = np.tile(np.arange(n_fonts), n_chars)
    images = np.arange(len(char_of), dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    return GlyphSet(images, char_of, font_of, [f"f{i}" for i in range(n_fonts)])


def test_split_is_disjoint_and_pairs_stay_in_c_and_their_fold() -> None:
    gs = _synthetic_glyphs()
    s = split_glyphs(gs, n_a=10, n_b=10, n_c=20, track_len=2, pairs_per_fold=5, seed=3)
    idx = {int(v): i for i, v in enumerate(gs.images[:, 0, 0])}  # image -> glyph row

    def chars(images):
        return {int(gs.char_of[idx[int(v)]]) for v in images[:, 0, 0]}

    a, b, c = chars(s.a_images), chars(s.b_images), chars(s.c_images)
    assert (len(a), len(b), len(c)) == (10, 10, 20)
    assert not (a & b or a & c or b & c)
    assert len(s.a_images) == 60 and s.a_labels.max() == 9
    # 6 fonts per B character in tracks of about 2: 3 tracks each, one character per track.
    assert s.n_seq == 30 and np.bincount(s.b_tracks).tolist() == [2] * 30
    for q in range(s.n_seq):
        assert len(chars(s.b_images[s.b_tracks == q])) == 1
    c_char = np.array([gs.char_of[idx[int(v)]] for v in s.c_images[:, 0, 0]])
    assert len(s.issame) == 100 and s.issame.sum() == 50
    assert np.all((c_char[s.pair_i] == c_char[s.pair_j]) == s.issame)
    assert np.all(s.pair_i != s.pair_j)
    for f in range(10):  # each fold's characters appear in no other fold
        here = set(c_char[s.pair_i[s.folds == f]]) | set(c_char[s.pair_j[s.folds == f]])
        there = set(c_char[s.pair_i[s.folds != f]]) | set(c_char[s.pair_j[s.folds != f]])
        assert not here & there
    with pytest.raises(ValueError, match="only 40 characters"):
        split_glyphs(gs, n_a=20, n_b=20, n_c=20, track_len=2, pairs_per_fold=5, seed=0)


def test_style_split_labels_print_fonts_and_tracks_the_others() -> None:
    gs = _synthetic_glyphs()
    names = sorted(PRINT_FONTS)[:3] + ["brush1", "brush2", "brush3"]
    gs = GlyphSet(gs.images, gs.char_of, gs.font_of, names)
    s = split_glyphs(gs, n_a=10, n_b=10, n_c=20, track_len=2, pairs_per_fold=5, seed=3,
                     styles=True)
    font = {int(v): int(gs.font_of[i]) for i, v in enumerate(gs.images[:, 0, 0])}

    def printed(images):
        return np.array([font[int(v)] < 3 for v in images[:, 0, 0]])

    assert printed(s.a_images).all() and len(s.a_images) == 30
    assert not printed(s.b_images).any() and len(s.b_images) == 30
    c = printed(s.c_images)
    assert c[s.pair_i].all() and not c[s.pair_j].any()  # every pair crosses the styles
    assert s.issame.sum() == 50


def test_missing_fonts_error_names_the_packages(tmp_path: Path) -> None:
    fonts = (FontSpec("fonts-nowhere-one", str(tmp_path / "a.ttf")),
             FontSpec("fonts-nowhere-two", str(tmp_path / "b.ttf")))
    with pytest.raises(MissingFontsError, match="fonts-nowhere-one fonts-nowhere-two"):
        require_fonts(1, fonts)


def test_command_for_replaces_options() -> None:
    cmd = command_for(["--steps", "5", "--conditions", "a-only,lsr", "--seeds=0,1"],
                      "experiments.cjk_table", conditions="lsr")
    assert cmd == ("python -m experiments.cjk_table --steps 5 --seeds=0,1 "
                   "--conditions lsr")


@pytest.fixture(scope="module")
def fonts() -> list[FontSpec]:
    have = available_fonts()
    if len(have) < 2:
        pytest.fail(TWO_FONTS_REASON)  # scripts/test.sh installs two: missing = broken setup
    return have


def test_claimed_code_points_stay_below_the_reserved_range(fonts) -> None:
    cps = claimed_code_points(fonts[0])
    assert cps and max(cps) < RESERVED_FROM and min(cps) >= 0x4E00


TINY = ["--max-chars", "60", "--min-fonts", "2", "--min-installed-fonts", "2", "--n-a", "10",
        "--n-b", "10", "--n-c", "20", "--pairs-per-fold", "4", "--steps", "3", "--batch", "8"]


def test_cjk_table_end_to_end(fonts, tmp_path_factory) -> None:
    cache = tmp_path_factory.getbasetemp() / "glyph-cache"
    out = tmp_path_factory.mktemp("table")
    report = cjk_table.main([*TINY, "--seeds", "0,1", "--cache-dir", str(cache),
                             "--out", str(out)])
    rows = {r["condition"]: r for r in report["rows"]}
    assert set(rows) == set(cjk_table.CONDITIONS)
    for cond, row in rows.items():
        assert row["seeds"] == [0, 1]
        assert f"--conditions {cond}" in row["command"]
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["tar@far=0.001"] <= 1.0
    assert report["sizes"]["pairs"] == 80
    assert "| sequence_classes |" in (out / "cjk_table.md").read_text()
    # The budget rule: sequence conditions add B on top of the same labeled images.
    by_cond = {r["condition"]: r for r in report["runs"]}
    assert by_cond["masked_softmax"]["sequence_mode"] == "masked_softmax"
    assert by_cond["a-only"]["sequence_mode"] == "-"


def test_cjk_sensitivity_end_to_end(fonts, tmp_path_factory) -> None:
    cache = tmp_path_factory.getbasetemp() / "glyph-cache"
    out = tmp_path_factory.mktemp("sens")
    report = cjk_sensitivity.main([*TINY, "--ps", "0.5", "--lams", "", "--weights", "0.1",
                                   "--cache-dir", str(cache), "--out", str(out)])
    settings = [r["setting"] for r in report["rows"]]
    assert settings[0] == "lsr (no DSA)" and settings[2:] == ["p=0.5", "w=0.1"]
    by_setting = {r["setting"]: r for r in report["runs"]}
    assert by_setting["p=0.5"]["dsa_p"] == 0.5 and by_setting["w=0.1"]["dsa_weight"] == 0.1
    assert by_setting["lsr (no DSA)"]["dsa_weight"] == 0.0
    assert "--set loss.dsa_p=0.5" in report["rows"][2]["command"]


@pytest.mark.slow  # two Ray runs through the CLI
@pytest.mark.timeout(600)
def test_cli_small_end_to_end(fonts, tmp_path) -> None:
    from experiments import cli_small

    report = cli_small.main(["--labeled", "6", "--people", "2", "--unseen", "20",
                             "--pairs-per-fold", "3", "--steps", "4", "--seeds", "0",
                             "--conditions", "a-only,default", "--min-installed-fonts", "2",
                             "--min-fonts", "2", "--max-chars", "60",
                             "--cache-dir", str(tmp_path / "cache"),
                             "--out", str(tmp_path / "out")])
    for cond in ("a-only", "default"):
        (acc,) = report["rows"][cond]["runs"]
        assert 0.0 <= acc <= 1.0, cond
    assert (tmp_path / "out" / "data" / "pairs.txt").read_text().startswith("10 3\n")

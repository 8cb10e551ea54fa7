"""The verification math on constructed scores whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seqface_dist.eval.verification import (
    auc,
    best_threshold,
    cosine_scores,
    evaluate_scores,
    kfold_accuracy,
    plot_roc,
    roc_curve,
    tar_at_far,
)


def test_perfectly_separable_gives_one() -> None:
    rng = np.random.default_rng(0)
    issame = rng.permutation(np.repeat([True, False], 300))
    scores = np.where(issame, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    res = evaluate_scores(scores, issame)
    assert res.fold_accuracies.tolist() == [1.0] * 10
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0
    assert res.auc == 1.0
    # Every chosen threshold separates the two groups.
    assert np.all(res.fold_thresholds > scores[~issame].max())
    assert np.all(res.fold_thresholds < scores[issame].min())


# One fold, sorted: 0.1 I, 0.2 I, 0.3 G, 0.4 I, 0.6 I, 0.7 G, 0.8 G, 0.9 G.
# Correct pairs for a threshold in each gap: <0.1: 4, (.1,.2): 5, (.2,.3): 6, (.3,.4): 5,
# (.4,.6): 6, (.6,.7): 7, (.7,.8): 6, (.8,.9): 5, >.9: 4 -> best 0.65, accuracy 7/8.
FOLD_SCORES = [0.9, 0.8, 0.7, 0.3, 0.1, 0.2, 0.4, 0.6]
FOLD_SAME = [True, True, True, True, False, False, False, False]


def test_best_threshold_known_case() -> None:
    thr, acc = best_threshold(np.array(FOLD_SCORES), np.array(FOLD_SAME))
    assert thr == pytest.approx(0.65)
    assert acc == 7 / 8


def test_ten_folds_known_threshold_and_accuracy() -> None:
    scores = np.tile(FOLD_SCORES, 10)
    issame = np.tile(FOLD_SAME, 10)
    res = evaluate_scores(scores, issame)
    np.testing.assert_allclose(res.fold_thresholds, 0.65)
    np.testing.assert_allclose(res.fold_accuracies, 7 / 8)
    assert "0.8750 ± 0.0000" in res.summary()


def test_threshold_comes_from_the_other_folds() -> None:
    # Fold 0 (A) sorted: .1 I, .2 I, .3 G, .4 G, .5 I, .9 G: best gap (.2,.3) -> 0.25 (5/6).
    # Fold 1 (B) sorted: .2 I, .6 I, .7 G, .8 G: best gap (.6,.7) -> 0.65 (4/4).
    # Test A with B's 0.65: 4/6 right; test B with A's 0.25: 3/4 right.
    a_s, a_y = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9], [False, False, True, True, False, True]
    b_s, b_y = [0.2, 0.6, 0.7, 0.8], [False, False, True, True]
    scores = np.array(a_s + b_s)
    issame = np.array(a_y + b_y)
    folds = np.array([0] * 6 + [1] * 4)
    accs, thrs = kfold_accuracy(scores, issame, folds=folds)
    np.testing.assert_allclose(thrs, [0.65, 0.25])
    np.testing.assert_allclose(accs, [4 / 6, 3 / 4])
    # Explicit fold labels work in any order: shuffle the pairs, keep their labels.
    perm = np.random.default_rng(1).permutation(10)
    accs2, thrs2 = kfold_accuracy(scores[perm], issame[perm], folds=folds[perm])
    np.testing.assert_allclose(accs2, accs)
    np.testing.assert_allclose(thrs2, thrs)
    res = evaluate_scores(scores, issame, folds=folds)
    assert res.accuracy == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert res.accuracy_std == pytest.approx((3 / 4 - 4 / 6) / 2)


def test_best_threshold_is_exact_on_random_scores() -> None:
    # Brute force: every score itself as a threshold, with both > and >=.
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        s = np.round(rng.normal(size=n), 1)  # rounding makes ties
        y = rng.random(n) < 0.5
        y[0], y[1] = True, False
        thr, acc = best_threshold(s, y)
        brute = max(max(np.mean((s > t) == y), np.mean((s >= t) == y)) for t in s)
        assert acc == pytest.approx(brute)
        assert np.mean((s > thr) == y) == pytest.approx(acc)


def test_tar_at_far_on_a_known_roc() -> None:
    impostor = np.arange(1000) / 1000.0  # 0.000 .. 0.999
    genuine = np.array([0.9995] * 20 + [0.995] * 17 + [0.5] * 63)
    scores = np.concatenate([genuine, impostor])
    issame = np.concatenate([np.ones(100, bool), np.zeros(1000, bool)])
    got = {round(t.far_target, 6): t for t in tar_at_far(scores, issame,
                                                         [1e-2, 1e-3, 1e-4, 0.4, 1.0])}
    # FAR 1e-2: 10 impostors may pass -> threshold 0.989 (0.990..0.999 pass).
    assert got[1e-2].threshold == pytest.approx(0.989)
    assert got[1e-2].far == pytest.approx(0.01) and got[1e-2].tar == pytest.approx(0.37)
    # FAR 1e-3: one impostor (0.999) passes -> threshold 0.998; only the 0.9995 group.
    assert got[1e-3].threshold == pytest.approx(0.998)
    assert got[1e-3].far == pytest.approx(1e-3) and got[1e-3].tar == pytest.approx(0.20)
    assert got[1e-3].resolvable
    # FAR 1e-4 < 1/1000: measured at FAR 0, and flagged.
    assert got[1e-4].far == 0.0 and got[1e-4].tar == pytest.approx(0.20)
    assert not got[1e-4].resolvable
    assert got[0.4].threshold == pytest.approx(0.599) and got[0.4].tar == pytest.approx(0.37)
    assert got[1.0].tar == 1.0 and got[1.0].far == 1.0


def test_tar_at_far_counts_exactly_at_round_products() -> None:
    # 3000 impostors at FAR 1e-3 must allow exactly 3 false accepts.
    impostor = np.linspace(0, 1, 3000)
    scores = np.concatenate([[2.0], impostor])
    issame = np.concatenate([[True], np.zeros(3000, bool)])
    (t,) = tar_at_far(scores, issame, [1e-3])
    assert t.far == pytest.approx(3 / 3000)


def test_roc_and_auc_match_rank_statistic() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.4
    s = np.round(rng.normal(size=300) + y, 1)
    fpr, tpr, thr = roc_curve(s, y)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(thr) < 0)
    for j in (1, len(thr) // 2, len(thr) - 1):
        assert tpr[j] == pytest.approx(np.mean(s[y] >= thr[j]))
        assert fpr[j] == pytest.approx(np.mean(s[~y] >= thr[j]))
    # AUC = P(genuine > impostor) + P(tie) / 2, over all genuine-impostor pairs.
    g, i = s[y][:, None], s[~y][None, :]
    mw = np.mean((g > i) + 0.5 * (g == i))
    assert auc(fpr, tpr) == pytest.approx(mw)


def test_cosine_scores_and_bad_input() -> None:
    a = np.array([[1.0, 0.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [6.0, 8.0]])
    np.testing.assert_allclose(cosine_scores(a, b), [0.0, 1.0])
    with pytest.raises(ValueError, match="both genuine and impostor"):
        evaluate_scores(np.ones(20), np.ones(20, bool))
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_scores(np.ones(20), np.ones(10, bool))
    with pytest.raises(ValueError, match="non-finite value nan at pair 3"):
        evaluate_scores(np.array([0, 1, 0, np.nan] * 5), np.array([0, 1] * 10))


def test_plot_roc_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(4)
    y = np.repeat([True, False], 100)
    r1 = evaluate_scores(rng.normal(size=200) + y, y)
    r2 = evaluate_scores(rng.normal(size=200) + 2 * y, y)
    out = plot_roc({"weak": r1, "strong": r2}, tmp_path / "sub" / "roc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.size == (600, 480)
    assert set(r1.metrics("lfw_")) >= {"lfw_accuracy", "lfw_auc", "lfw_tar@far=0.001"}

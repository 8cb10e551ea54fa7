"""Pairs verification, pure numpy: 10-fold accuracy, TAR at FAR, ROC and its AUC.

Scores are similarities (higher = more likely the same person), e.g. cosine similarity
of L2-normalised embeddings. A pair is predicted "same" iff its score > threshold.

    from seqface_dist.eval.verification import cosine_scores, evaluate_scores
    res = evaluate_scores(cosine_scores(f1, f2), issame)
    print(res.summary())
    plot_roc({"sphere20": res}, "roc.png")

The 10-fold protocol (LFW's "unrestricted" reporting): the pairs are cut into 10 folds
(contiguous chunks, which for LFW's ``pairs.txt`` are exactly its 10 sets); for each fold
the threshold with the best accuracy on the other 9 folds is applied to it. The threshold
search is exact (every midpoint between consecutive distinct training scores), not a grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_FARS: tuple[float, ...] = (1e-3, 1e-4)


@dataclass
class TarAtFar:
    far_target: float
    tar: float
    far: float  # the FAR actually reached at the chosen threshold (<= far_target)
    threshold: float
    resolvable: bool  # False when far_target < 1 / n_impostors: measured at FAR = 0


@dataclass
class VerificationResult:
    n_pairs: int
    n_genuine: int
    n_impostor: int
    fold_accuracies: np.ndarray  # (n_folds,)
    fold_thresholds: np.ndarray  # (n_folds,), chosen on the other folds
    tar_at_far: list[TarAtFar]
    fpr: np.ndarray  # ROC, from (0, 0) to (1, 1)
    tpr: np.ndarray
    auc: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.fold_accuracies.mean())

    @property
    def accuracy_std(self) -> float:
        # Population std (ddof=0), as the field's reference evaluation reports it.
        return float(self.fold_accuracies.std())

    @property
    def threshold(self) -> float:
        return float(self.fold_thresholds.mean())

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat name -> value dict, for logs and metrics."""
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}accuracy_std": self.accuracy_std,
               f"{prefix}threshold": self.threshold, f"{prefix}auc": self.auc}
        for t in self.tar_at_far:
            out[f"{prefix}tar@far={t.far_target:g}"] = t.tar
        out.update({f"{prefix}{k}": v for k, v in self.extra.items()})
        return out

    def summary(self) -> str:
        lines = [f"pairs: {self.n_pairs} ({self.n_genuine} genuine, {self.n_impostor} impostor)",
                 f"{len(self.fold_accuracies)}-fold accuracy: {self.accuracy:.4f} ± "
                 f"{self.accuracy_std:.4f} (threshold {self.threshold:.4f})"]
        for t in self.tar_at_far:
            note = "" if t.resolvable else (
                f"  [below 1/{self.n_impostor} impostors: measured at FAR=0]")
            lines.append(f"TAR@FAR={t.far_target:g}: {t.tar:.4f} "
                         f"(FAR {t.far:.2e}, threshold {t.threshold:.4f}){note}")
        lines.append(f"ROC AUC: {self.auc:.4f}")
        return "\n".join(lines)


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) feature arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cosine_scores: need two (N, D) arrays of one shape, got "
                         f"{a.shape} and {b.shape}")
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _check_inputs(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame).reshape(-1)
    if issame.dtype != bool:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError("issame: must hold booleans (or 0/1)")
        issame = issame.astype(bool)
    if scores.shape != issame.shape:
        raise ValueError(f"scores ({scores.size}) and issame ({issame.size}) differ in length")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"scores: non-finite value {scores[bad]} at pair {bad}")
    if issame.all() or (~issame).all():
        raise ValueError("verification needs both genuine and impostor pairs")
    return scores, issame


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold with the best accuracy on these pairs, and that accuracy.

    Candidates are every midpoint between consecutive distinct scores, plus one below
    the minimum and one above the maximum; so the search is exact. Among equally good
    thresholds the middle one (by rank) is taken.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    uniq, first = np.unique(s, return_index=True)
    # Threshold k (k = 0..len(uniq)) sits just below uniq[k]: pairs before first[k]
    # are predicted different, the rest same.
    cut = np.append(first, s.size)
    neg_below = np.concatenate([[0], np.cumsum(~y)])[cut]
    pos_below = np.concatenate([[0], np.cumsum(y)])[cut]
    correct = neg_below + (int(y.sum()) - pos_below)
    best = np.flatnonzero(correct == correct.max())
    k = int(best[len(best) // 2])
    if k == 0:
        thr = uniq[0] - 1.0
    elif k == uniq.size:
        thr = uniq[-1] + 1.0
    else:
        thr = (uniq[k - 1] + uniq[k]) / 2.0
    return float(thr), float(correct[k] / s.size)


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                   folds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracy and the threshold chosen on the other folds.

    ``folds`` gives each pair's fold (0..n_folds-1); by default the pairs are cut into
    ``n_folds`` contiguous chunks (``numpy.array_split`` sizes).
    """
    scores, issame = _check_inputs(scores, issame)
    if folds is None:
        if n_folds < 2 or n_folds > scores.size:
            raise ValueError(f"n_folds must be in [2, {scores.size}], got {n_folds}")
        folds = np.concatenate([np.full(len(c), i) for i, c in
                                enumerate(np.array_split(np.arange(scores.size), n_folds))])
    folds = np.asarray(folds).reshape(-1)
    if folds.shape != scores.shape:
        raise ValueError(f"folds ({folds.size}) and scores ({scores.size}) differ in length")
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError("k-fold verification needs at least 2 folds")
    accs, thrs = [], []
    for f in ids:
        test = folds == f
        train = ~test
        if issame[train].all() or (~issame[train]).all():
            raise ValueError(f"fold {f}: the other folds hold only one kind of pair")
        thr, _ = best_threshold(scores[train], issame[train])
        accs.append(float(np.mean((scores[test] > thr) == issame[test])))
        thrs.append(thr)
    return np.asarray(accs), np.asarray(thrs)


def tar_at_far(scores: np.ndarray, issame: np.ndarray,
               far_targets: Sequence[float] = DEFAULT_FARS) -> list[TarAtFar]:
    """TAR at each target FAR, the threshold set from the impostor scores alone.

    With n impostors, at most k = floor(FAR * n) may score above the threshold, so the
    threshold is the (k+1)-th highest impostor score (accept iff score > threshold).
    Ties can make the reached FAR lower than k/n; it is reported as is. A target below
    1/n cannot be resolved: it is measured at FAR = 0 and flagged.
    """
    scores, issame = _check_inputs(scores, issame)
    imp = np.sort(scores[~issame])[::-1]
    gen = scores[issame]
    out = []
    for far in far_targets:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"far_targets: {far} is not in [0, 1]")
        k = math.floor(far * imp.size + 1e-9)  # 1e-9: 1e-3 * 3000 must give 3, not 2
        if k >= imp.size:
            thr = float(imp[-1]) - 1.0  # accept everything
        else:
            thr = float(imp[k])
        out.append(TarAtFar(far_target=float(far), tar=float(np.mean(gen > thr)),
                            far=float(np.mean(imp > thr)), threshold=thr,
                            resolvable=far * imp.size >= 1.0 - 1e-9))
    return out


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, from (0, 0) to (1, 1).

    Point j accepts the pairs with score >= thresholds[j] (thresholds decreasing).
    """
    scores, issame = _check_inputs(scores, issame)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last = np.flatnonzero(np.diff(s) != 0)  # last index of each run of equal scores
    last = np.append(last, s.size - 1)
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    tpr = np.concatenate([[0.0], tp / y.sum()])
    fpr = np.concatenate([[0.0], fp / (~y).sum()])
    thr = np.concatenate([[np.inf], s[last]])
    return fpr, tpr, thr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (trapezoids: ties count one half)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def evaluate_scores(scores: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                    folds: np.ndarray | None = None,
                    far_targets: Sequence[float] = DEFAULT_FARS) -> VerificationResult:
    """Everything at once: k-fold accuracy, TAR@FAR, ROC and AUC."""
    scores, issame = _check_inputs(scores, issame)
    accs, thrs = kfold_accuracy(scores, issame, n_folds=n_folds, folds=folds)
    fpr, tpr, _ = roc_curve(scores, issame)
    return VerificationResult(
        n_pairs=int(scores.size), n_genuine=int(issame.sum()),
        n_impostor=int((~issame).sum()), fold_accuracies=accs, fold_thresholds=thrs,
        tar_at_far=tar_at_far(scores, issame, far_targets), fpr=fpr, tpr=tpr,
        auc=auc(fpr, tpr))


def plot_roc(results: VerificationResult | Mapping[str, VerificationResult],
             path: str | Path, title: str = "ROC") -> Path:
    """Write a ROC plot (TAR against FAR, log FAR axis) as PNG; one curve per result."""
    if isinstance(results, VerificationResult):
        results = {"model": results}
    fig, ax = roc_figure()
    floor = 1.0
    for label, r in results.items():
        # The log axis cannot show FAR = 0; start each curve at its first non-zero FAR.
        keep = r.fpr > 0
        floor = min(floor, float(r.fpr[keep].min()))
        ax.plot(r.fpr[keep], r.tpr[keep], label=f"{label} (AUC {r.auc:.4f}, "
                f"acc {r.accuracy:.4f})")
    return save_roc(fig, ax, floor, title, path)


def roc_figure():
    """(figure, axes) for a ROC plot: a Figure on an Agg canvas, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_roc(fig, ax, floor: float, title: str, path: str | Path) -> Path:
    """Finish a ROC plot (log FAR axis from ``floor``, labels, legend) and write the PNG."""
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

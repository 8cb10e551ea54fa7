"""The Table-1 analogue (SeqFace, Hu et al. 2018) on CJK glyphs drawn by Debian's fonts.

A character is an identity, a font is one photo of it (see `experiments/glyphs.py`).
The characters (code points U+4E00..U+7FFF with at least `--min-fonts` valid renders) are
shuffled once (`--split-seed`) and cut into
  A  `--n-a` labeled identities,
  B  `--n-b` classes used only as sequences: each B character's fonts are cut into tracks
     of about `--track-len` fonts, each track its own sequence (tracks of one character
     are not known to match, like two video tracks of one person),
  C  `--n-c` unseen classes for verification: 10 folds of disjoint characters, each with
     `--pairs-per-fold` genuine (one character, two fonts) and as many impostor pairs.
With `--styles` (experiment E2) A keeps only its print-font renders, B's tracks only the
other fonts' and every C pair crosses the two (see `split_glyphs`).

Every run trains through the one training step (`seqface_dist.train.step`) from the base
config `--config` (default `configs/local-cpu.yaml`, the config a new user starts from)
with the glyphs' overrides (32x32 grey, no mirroring) and `--set key=value`. Conditions
(`experiments.common.CONDITIONS`), under the budget rule (`--batch` labeled images per
step for `--steps` steps; sequence conditions add `--batch` B images on top):
  a-only      A only
  a-only-2x   A only at the doubled batch (the compute-matched control)
  upper       A + B with B labeled (B characters as identities), at the doubled batch
  lsr, none, sequence_classes, separate_heads, masked_softmax
              A + B tracks in that `loss.sequence_mode` (DESIGN.md §2.2a); DSA in all
For each condition and seed: 10-fold accuracy, TAR@FAR and AUC on the C pairs (cosine of
the features), the recovered share of the labeled gain (acc - a-only) / (upper - a-only)
per seed, and the collapse diagnostics. Rows report mean ± std over the seeds.

Needs the fonts (Debian):
  apt-get update && apt-get install -y --no-install-recommends fonts-arphic-ukai ...
(the full line is `experiments.glyphs.APT_LINE`; the script names what is missing).

    python -m experiments.cjk_table --n-a 100 --out docs/results/e1-a100   # E1 table
    python -m experiments.cjk_table --n-a 100 --styles --out docs/results/e2  # E2 table
    python -m experiments.cjk_table --conditions lsr --seeds 0       # one row, one seed
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.common import (
    CONDITIONS,
    TrainData,
    condition_config,
    embed,
    experiment_config,
    train,
)
from experiments.glyphs import (
    PRINT_FONTS,
    GlyphSet,
    available_fonts,
    load_glyphs,
    require_fonts,
)
from seqface_dist.eval.verification import cosine_scores, evaluate_scores

FARS = (1e-2, 1e-3)


@dataclass
class Split:
    a_images: np.ndarray
    a_labels: np.ndarray  # 0..n_a-1
    b_images: np.ndarray
    b_chars: np.ndarray  # 0..n_b-1 (the character, used only by "upper")
    b_tracks: np.ndarray  # 0..n_seq-1
    c_images: np.ndarray
    c_labels: np.ndarray  # 0..n_c-1
    pair_i: np.ndarray  # indices into c_images
    pair_j: np.ndarray
    issame: np.ndarray
    folds: np.ndarray
    n_a: int
    n_b: int
    n_seq: int
    n_c: int


def split_glyphs(gs: GlyphSet, n_a: int, n_b: int, n_c: int, track_len: int,
                 pairs_per_fold: int, seed: int, styles: bool = False) -> Split:
    """Cut the characters into A, B (tracks) and C (10 folds of pairs); deterministic.

    ``styles`` (experiment E2, variation only the tracks carry): A keeps only its renders
    in print fonts (`glyphs.PRINT_FONTS`), B's tracks only renders in the other fonts
    (brush, kai, handwriting), and every C pair, genuine or impostor, is one print render
    against one other render.
    """
    if styles:
        printed = np.isin(np.asarray(gs.font_names)[gs.font_of], list(PRINT_FONTS))
        both = [c for c in gs.chars() if printed[gs.char_of == c].sum() >= 1
                and (~printed[gs.char_of == c]).sum() >= 2]
        keep = np.isin(gs.char_of, both)
        gs = GlyphSet(gs.images[keep], gs.char_of[keep], gs.font_of[keep], gs.font_names)
        printed = printed[keep]
    chars = gs.chars()
    if n_a + n_b + n_c > len(chars):
        raise ValueError(f"--n-a + --n-b + --n-c = {n_a + n_b + n_c} but only {len(chars)} "
                         f"characters have enough fonts")
    if n_c < 20:
        raise ValueError("--n-c must be at least 20 (10 folds of disjoint characters, two or "
                         "more per fold for impostor pairs)")
    rng = np.random.default_rng(seed)
    chars = rng.permutation(chars)
    a, b, c = chars[:n_a], chars[n_a:n_a + n_b], chars[n_a + n_b:n_a + n_b + n_c]

    def rows(cs, style=None):
        sel = np.ones(len(gs.char_of), bool) if style is None else printed == style
        return {int(ch): np.flatnonzero((gs.char_of == ch) & sel) for ch in cs}

    if styles:
        ra, rb, rc = rows(a, True), rows(b, False), rows(c)
    else:
        ra, rb, rc = rows(a), rows(b), rows(c)
    a_idx = np.concatenate(list(ra.values()))
    a_lab = np.concatenate([np.full(len(v), k) for k, v in enumerate(ra.values())])
    b_idx, b_char, b_track, n_seq = [], [], [], 0
    for k, v in enumerate(rb.values()):
        parts = np.array_split(rng.permutation(v), max(1, round(len(v) / track_len)))
        for part in parts:
            b_idx.append(part)
            b_char.append(np.full(len(part), k))
            b_track.append(np.full(len(part), n_seq))
            n_seq += 1
    c_idx = np.concatenate(list(rc.values()))
    c_lab = np.concatenate([np.full(len(v), k) for k, v in enumerate(rc.values())])
    pos = {int(g): p for p, g in enumerate(c_idx)}
    c_rows = [np.array([pos[int(g)] for g in v]) for v in rc.values()]
    c_printed = printed[c_idx] if styles else None
    # The pairs' own generator: C and its pairs do not change with --track-len.
    rng = np.random.default_rng([seed, 1])

    def draw(rows_of: np.ndarray, style: bool | None) -> int:
        if style is not None:
            rows_of = rows_of[c_printed[rows_of] == style]
        return int(rng.choice(rows_of))

    # Plain: two renders of one character (genuine) or of two (impostor); with styles,
    # always one print render against one other render.
    first, second = (True, False) if styles else (None, None)
    pi, pj, same, folds = [], [], [], []
    for f, group in enumerate(np.array_split(np.arange(n_c), 10)):
        for _ in range(pairs_per_fold):
            r = c_rows[rng.choice(group)]
            if styles:
                i, j = draw(r, first), draw(r, second)
            else:
                i, j = rng.choice(r, 2, replace=False)
            pi.append(i), pj.append(j), same.append(True), folds.append(f)
        for _ in range(pairs_per_fold):
            x, y = rng.choice(group, 2, replace=False)
            pi.append(draw(c_rows[x], first)), pj.append(draw(c_rows[y], second))
            same.append(False), folds.append(f)
    return Split(gs.images[a_idx], a_lab, gs.images[np.concatenate(b_idx)],
                 np.concatenate(b_char), np.concatenate(b_track), gs.images[c_idx], c_lab,
                 np.asarray(pi), np.asarray(pj), np.asarray(same), np.asarray(folds),
                 n_a, n_b, n_seq, n_c)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n-a", type=int, default=300, help="labeled classes")
    ap.add_argument("--n-b", type=int, default=1000, help="classes used as sequences")
    ap.add_argument("--n-c", type=int, default=1000, help="unseen classes for pairs")
    ap.add_argument("--min-fonts", type=int, default=18,
                    help="keep characters with at least this many valid renders")
    ap.add_argument("--track-len", type=int, default=5, help="fonts per B track (about)")
    ap.add_argument("--pairs-per-fold", type=int, default=300)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--styles", action="store_true",
                    help="E2: A in print fonts, B's tracks in the other fonts, C pairs "
                         "crossing styles")
    ap.add_argument("--config", default="local-cpu",
                    help="the named base config (configs/<name>.yaml) or a YAML path")
    ap.add_argument("--steps", type=int, default=1000, help="optim.max_steps")
    ap.add_argument("--batch", type=int, default=64,
                    help="labeled images per step (data.identities_per_batch); sequence "
                         "conditions add as many B images (data.sequences_per_batch)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override (repeatable), e.g. "
                    "--set loss.dsa_weight=0")
    ap.add_argument("--max-chars", type=int, default=None,
                    help="render only the first N eligible characters (smoke tests)")
    ap.add_argument("--min-installed-fonts", type=int, default=12)
    ap.add_argument("--cache-dir", default="runs/cache", help="rendered-glyph cache (.npz)")
    ap.add_argument("--threads", type=int, default=1)


def load_split(args: argparse.Namespace, log=print) -> Split:
    fonts = require_fonts(args.min_installed_fonts)
    log(f"{len(fonts)} fonts installed: {', '.join(f.name for f in fonts)}")
    render_min = min(12, args.min_fonts)
    gs = load_glyphs(fonts, args.cache_dir, min_fonts=render_min, max_chars=args.max_chars,
                     log=log).with_min_fonts(args.min_fonts)
    split = split_glyphs(gs, args.n_a, args.n_b, args.n_c, args.track_len,
                         args.pairs_per_fold, args.split_seed, styles=args.styles)
    log(f"{len(gs.chars())} characters with >= {args.min_fonts} fonts; A {split.n_a} classes "
        f"({len(split.a_labels)} images), B {split.n_b} classes as {split.n_seq} tracks "
        f"({len(split.b_tracks)} images), C {split.n_c} classes ({len(split.c_images)} "
        f"images, {len(split.issame)} pairs)")
    return split


def glyph_overrides(args: argparse.Namespace, size: int) -> list[str]:
    """The base config's recipe on glyphs: one grey channel, no mirroring, the budget."""
    return [f"model.input_size=[{size}, {size}]", "model.in_channels=1", "data.flip=false",
            f"optim.max_steps={args.steps}", f"data.identities_per_batch={args.batch}",
            f"data.sequences_per_batch={args.batch}", *args.overrides]


def run_one(split: Split, condition: str, seed: int, args: argparse.Namespace,
            overrides: list[str] | None = None, *, log=print) -> dict:
    """Train one condition with one seed; verification figures on the C pairs."""
    size = split.a_images.shape[1]
    cfg = experiment_config(args.config, glyph_overrides(args, size) + list(overrides or [])
                            + [f"train.seed={seed}"])
    cfg = condition_config(cfg, condition)
    if condition == "upper":
        data = TrainData(np.concatenate([split.a_images, split.b_images]),
                         np.concatenate([split.a_labels, split.b_chars + split.n_a]),
                         split.n_a + split.n_b)
    else:
        data = TrainData(split.a_images, split.a_labels, split.n_a, split.b_images,
                         split.b_tracks, split.n_seq)
    net, final, weight = train(cfg, data, log=log, tag=f"{condition}/seed{seed}")
    feats = embed(net, split.c_images)
    res = evaluate_scores(cosine_scores(feats[split.pair_i], feats[split.pair_j]),
                          split.issame, folds=split.folds, far_targets=FARS)
    out = {"condition": condition, "seed": seed, "accuracy": res.accuracy,
           "accuracy_fold_std": res.accuracy_std, "auc": res.auc, "final": final,
           "sequence_mode": cfg.loss.sequence_mode if cfg.data.sequences_per_batch else "-",
           "dsa_p": cfg.loss.dsa_p, "dsa_lam": cfg.loss.dsa_lambda,
           "dsa_weight": cfg.loss.dsa_weight,
           **collapse_diagnostics(feats, split.c_labels, weight[:split.n_a].double().numpy())}
    for t in res.tar_at_far:
        out[f"tar@far={t.far_target:g}"] = t.tar
    log(f"[{condition} seed {seed}] C pairs: accuracy {res.accuracy:.4f} ± "
        f"{res.accuracy_std:.4f} (10 folds), " + ", ".join(
            f"TAR@FAR={t.far_target:g} {t.tar:.4f}" for t in res.tar_at_far)
        + f", AUC {res.auc:.4f}, best cos to W {out['best_cos_to_w']:.3f} "
        f"({final['seconds']:.0f} s)")
    return out


def collapse_diagnostics(feats: np.ndarray, labels: np.ndarray, weight: np.ndarray) -> dict:
    """How unseen classes sit against the labeled classes' weights: the mean over unseen
    classes of the best cosine of the class's mean feature to any identity row of W, and
    the mean share of a unit feature's energy inside the span of those rows."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True).clip(1e-12)
    classes = np.unique(labels)
    means = np.stack([f[labels == c].mean(0) for c in classes])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    q, _ = np.linalg.qr(w.T)  # orthonormal basis of the rows' span (D x min(N, D))
    energy = np.square(f @ q).sum(1)
    return {"best_cos_to_w": float((means @ w.T).max(1).mean()),
            "energy_in_w_span": float(energy.mean())}


def summarise(results: list[dict], key_fields: tuple[str, ...]) -> list[dict]:
    """Mean ± std (over seeds, ddof=0) of each metric for each group of `key_fields`."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(key_fields, key, strict=True))
        row["seeds"] = [r["seed"] for r in rs]
        for metric in ["accuracy", "auc", "best_cos_to_w", "energy_in_w_span"] + \
                [f"tar@far={f:g}" for f in FARS]:
            v = np.array([r[metric] for r in rs])
            row[metric] = float(v.mean())
            row[metric + "_std"] = float(v.std())
        rows.append(row)
    return rows


def command_for(argv: list[str], module: str, **replace: str) -> str:
    """The command line that reproduces a row: `argv` with some options replaced."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name.startswith("--") and name[2:].replace("-", "_") in replace:
            skip = "=" not in a and i + 1 < len(argv)
            continue
        out.append(a)
    for k, v in replace.items():
        out += [f"--{k.replace('_', '-')}", v]
    return shlex.join(["python", "-m", module, *out])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--upper-from", default="a-only",
                    help="the baseline of the recovered share (acc - base) / (upper - base)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/cjk-table",
                    help="folder for cjk_table.json / .md (docs/results/<name> for the docs)")
    args = ap.parse_args(argv)
    conditions = args.conditions.split(",")
    if bad := [c for c in conditions if c not in CONDITIONS]:
        ap.error(f"--conditions: unknown {bad}; choose from {CONDITIONS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    split = load_split(args, log=lambda s: print(s, flush=True))
    results = []
    for cond in conditions:
        for seed in seeds:
            results.append(run_one(split, cond, seed, args,
                                   log=lambda s: print(s, flush=True)))
    rows = summarise(results, ("condition",))
    add_recovered(rows, results, args.upper_from)
    for row in rows:
        row["command"] = command_for(argv, "experiments.cjk_table",
                                     conditions=row["condition"])
    report = {"args": vars(args), "fonts": [f.name for f in available_fonts()],
              "sizes": {"a": split.n_a, "b": split.n_b, "b_tracks": split.n_seq,
                        "c": split.n_c, "a_images": len(split.a_labels),
                        "b_images": len(split.b_tracks), "c_images": len(split.c_images),
                        "pairs": len(split.issame)},
              "rows": rows, "runs": results, "seconds": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cjk_table.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "cjk_table.md").write_text(markdown_table(rows))
    print(markdown_table(rows), flush=True)
    print(f"wrote {out / 'cjk_table.json'} and {out / 'cjk_table.md'} "
          f"({report['seconds']:.0f} s)", flush=True)
    return report


def add_recovered(rows: list[dict], results: list[dict], base: str = "a-only") -> None:
    """Each row's share of the labeled gain, (acc - base) / (upper - base), per seed (the
    same seed's base and upper), as mean ± std; absent without both reference rows."""
    by = {(r["condition"], r["seed"]): r["accuracy"] for r in results}
    for row in rows:
        shares = [(by[(row["condition"], s)] - by[(base, s)]) / (by[("upper", s)] - by[(base, s)])
                  for s in row["seeds"] if (base, s) in by and ("upper", s) in by
                  and by[("upper", s)] != by[(base, s)]]
        if shares:
            row["recovered"] = float(np.mean(shares))
            row["recovered_std"] = float(np.std(shares))


def markdown_table(rows: list[dict], first: str = "condition") -> str:
    head = [first, "10-fold acc.", "TAR@FAR=1e-2", "TAR@FAR=1e-3", "AUC", "recovered",
            "best cos to W", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[first])] + [f"{r[k]:.4f} ± {r[k + '_std']:.4f}" for k in
                                   ("accuracy", "tar@far=0.01", "tar@far=0.001", "auc")]
        cells.append(f"{r['recovered']:+.2f} ± {r['recovered_std']:.2f}" if "recovered" in r
                     else "")
        cells.append(f"{r['best_cos_to_w']:.3f}")
        cells.append(",".join(map(str, r["seeds"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

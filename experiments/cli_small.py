"""A small set run the way a new user runs one: image folders -> `seqface shards build` ->
`seqface train --config configs/local-cpu.yaml` (2 Ray workers) -> `seqface eval pairs`.

The regime of a small real-face check: `--labeled` labeled characters (identities), `--people`
characters seen only as `--tracks` tracks each (unlabeled sequences), unseen characters in
LFW-layout pairs (10 folds). Conditions, under the budget rule (`--batch` labeled samples
per step, sequence runs add `--batch` track samples, `--steps` steps):
  a-only    the labeled characters only
  default   + the tracks, with the config's default sequence handling
  labeled   the track characters labeled instead (identities), at the doubled batch
Characters are drawn with `--split-seed` from those E1/E2 do not fix (a fresh shuffle).
`--styles` is the small analogue of E2 (the tracks carry the styles the labeled set lacks).

    python -m experiments.cli_small                   # ~2 min a run on 2 cores
    python -m experiments.cli_small --seeds 0 --steps 50 --out runs/cli-small-test
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.glyphs import PRINT_FONTS, load_glyphs, require_fonts

CONDITIONS = ("a-only", "default", "labeled")


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(255 - img).save(path, quality=95)  # dark ink on white, like a photo


def write_folders(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """ids/<char>/, seqs/<track>/, labeled/<char>/ (ids + the track characters) and the
    unseen characters' images and pairs.txt (LFW layout)."""
    gs = load_glyphs(require_fonts(args.min_installed_fonts), args.cache_dir,
                     min_fonts=min(12, args.min_fonts), max_chars=args.max_chars,
                     log=lambda s: None).with_min_fonts(args.min_fonts)
    rng = np.random.default_rng(args.split_seed)
    printed = np.isin(np.asarray(gs.font_names)[gs.font_of], list(PRINT_FONTS))
    # --styles: labeled renders in print fonts, tracks in the others, pairs across both.
    a_rows = printed if args.styles else np.ones_like(printed)
    b_rows = ~printed if args.styles else np.ones_like(printed)
    chars = rng.permutation(gs.chars())
    a, b = chars[:args.labeled], chars[args.labeled:args.labeled + args.people]
    c = chars[args.labeled + args.people:args.labeled + args.people + args.unseen]
    for ch in a:
        for k, i in enumerate(np.flatnonzero((gs.char_of == ch) & a_rows)):
            _save(gs.images[i], root / "ids" / f"c{ch:x}" / f"{k:03d}.jpg")
            _save(gs.images[i], root / "labeled" / f"c{ch:x}" / f"{k:03d}.jpg")
    for ch in b:
        rows = rng.permutation(np.flatnonzero((gs.char_of == ch) & b_rows))
        for t, part in enumerate(np.array_split(rows, args.tracks)):
            for k, i in enumerate(part):
                _save(gs.images[i], root / "seqs" / f"c{ch:x}-t{t}" / f"{k:03d}.jpg")
        for k, i in enumerate(rows):
            _save(gs.images[i], root / "labeled" / f"c{ch:x}" / f"{k:03d}.jpg")
    names, c_printed = {}, {}
    for ch in c:
        rows = np.flatnonzero(gs.char_of == ch)
        name = f"u{ch:x}"
        names[name] = len(rows)
        c_printed[name] = printed[rows]
        for k, i in enumerate(rows):
            _save(gs.images[i], root / "lfw" / name / f"{name}_{k + 1:04d}.jpg")
    groups = np.array_split(np.array(sorted(names)), 10)
    lines = [f"10 {args.pairs_per_fold}"]
    def pick(name: str, style: bool | None) -> int:  # 1-based image number
        ok = [k for k, p in enumerate(c_printed[name]) if style is None or p == style]
        return int(rng.choice(ok)) + 1

    first, second = (True, False) if args.styles else (None, None)
    for g in groups:
        for _ in range(args.pairs_per_fold):
            n = rng.choice(g)
            if args.styles:
                i, j = pick(n, first), pick(n, second)
            else:
                i, j = rng.choice(names[n], 2, replace=False) + 1
            lines.append(f"{n}\t{i}\t{j}")
        for _ in range(args.pairs_per_fold):
            n1, n2 = rng.choice(g, 2, replace=False)
            lines.append(f"{n1}\t{pick(n1, first)}\t{n2}\t{pick(n2, second)}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return {k: root / k for k in ("ids", "seqs", "labeled", "lfw")} | {
        "pairs": root / "pairs.txt"}


def seqface(*argv: str) -> str:
    """Run the `seqface` console script of this environment; its output, or fail loudly."""
    exe = Path(sys.executable).with_name("seqface")
    proc = subprocess.run([str(exe), *argv], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"seqface {' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_condition(cond: str, seed: int, args: argparse.Namespace, paths: dict,
                  shards: dict, out: Path) -> dict:
    name = f"{cond}-seed{seed}-{time.strftime('%H%M%S')}"
    over = [f"model.input_size=[{args.size}, {args.size}]", "model.in_channels=1",
            "data.flip=false", f"optim.max_steps={args.steps}", f"train.seed={seed}",
            f"train.run_name={name}", f"train.storage_path={(out / 'runs').resolve()}",
            "eval.pairs=", "metrics.enabled=false", f"train.checkpoint_every={args.steps}",
            f"data.identities_per_batch={args.batch}"]
    if cond == "a-only":
        over += [f"data.identity_shards=[{shards['ids']}]", "data.sequence_shards=[]",
                 "data.sequences_per_batch=0"]
    elif cond == "default":
        over += [f"data.identity_shards=[{shards['ids']}]",
                 f"data.sequence_shards=[{shards['seqs']}]",
                 f"data.sequences_per_batch={args.batch}"]
    else:
        over += [f"data.identity_shards=[{shards['labeled']}]", "data.sequence_shards=[]",
                 "data.sequences_per_batch=0", f"data.identities_per_batch={2 * args.batch}"]
    over += args.overrides
    t0 = time.time()
    log = seqface("train", "--config", args.config, *over)
    ckpt = re.search(r"latest checkpoint (\S+)", log)
    if ckpt is None:
        raise RuntimeError(f"no checkpoint in the train output:\n{log[-2000:]}")
    model = Path(ckpt.group(1)) / "export"
    ev = seqface("eval", "pairs", "--model", str(model), "--pairs", str(paths["pairs"]),
                 "--root", str(paths["lfw"]), "--no-progress")
    acc = re.search(r"fold accuracy: ([0-9.]+)", ev)
    res = {"condition": cond, "seed": seed, "accuracy": float(acc.group(1)) if acc else None,
           "seconds": time.time() - t0, "eval": ev.strip()}
    print(f"[{cond} seed {seed}] accuracy {res['accuracy']} ({res['seconds']:.0f} s)",
          flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/local-cpu.yaml")
    ap.add_argument("--labeled", type=int, default=24)
    ap.add_argument("--people", type=int, default=8, help="characters seen only as tracks")
    ap.add_argument("--tracks", type=int, default=2, help="tracks per such character")
    ap.add_argument("--unseen", type=int, default=40)
    ap.add_argument("--pairs-per-fold", type=int, default=30)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override of every run (repeatable)")
    ap.add_argument("--split-seed", type=int, default=7)
    ap.add_argument("--styles", action="store_true",
                    help="labeled renders in print fonts, tracks in the other fonts, every "
                         "pair one print render against one other (where labeling B helps)")
    ap.add_argument("--min-fonts", type=int, default=12,
                    help="keep characters with at least this many valid renders")
    ap.add_argument("--max-chars", type=int, default=None,
                    help="render only the first N eligible characters (tests)")
    ap.add_argument("--min-installed-fonts", type=int, default=12)
    ap.add_argument("--cache-dir", default="runs/cache")
    ap.add_argument("--out", default="runs/cli-small")
    args = ap.parse_args(argv)
    out = Path(args.out)
    paths = write_folders(args, out / "data")
    shards = {}
    for kind, tree in (("ids", "identity-tree"), ("seqs", "sequence-tree"),
                       ("labeled", "identity-tree")):
        shards[kind] = out / "shards" / kind
        if not (shards[kind] / "manifest.json").is_file():  # the builder is idempotent too
            seqface("shards", "build", tree, str(paths[kind]), str(shards[kind]),
                    "--image-size", f"{args.size}x{args.size}", "--channels", "1",
                    "--no-progress")
    results = [run_condition(cond, int(seed), args, paths, shards, out)
               for cond in args.conditions.split(",") for seed in args.seeds.split(",")]
    rows = {}
    for cond in args.conditions.split(","):
        accs = [r["accuracy"] for r in results if r["condition"] == cond]
        rows[cond] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs}
        print(f"{cond:10s} {rows[cond]['mean']:.4f} ± {rows[cond]['std']:.4f} {accs}",
              flush=True)
    report = {"args": vars(args), "rows": rows, "runs": results}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

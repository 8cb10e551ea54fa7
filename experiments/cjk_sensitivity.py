"""Sensitivity of LSR + DSA to the DSA parameters on the CJK data (the paper's parameter
study, smaller budget): one parameter varied at a time around the reference values
p = 0.01, lambda = 0.5, DSA loss weight 0.04; `lsr` (no DSA) is the reference row.

    python -m experiments.cjk_sensitivity                     # the published table
    python -m experiments.cjk_sensitivity --steps 400 --seeds 0

Same split and options as `experiments.cjk_table` (shared arguments).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from experiments.cjk_table import add_common_args, load_split, markdown_table, run_one, summarise


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.set_defaults(steps=400)
    ap.add_argument("--ps", default="0.002,0.05", help="DSA p values besides --dsa-p")
    ap.add_argument("--lams", default="0.25,0.75", help="DSA lambda values besides --dsa-lam")
    ap.add_argument("--weights", default="0.01,0.16",
                    help="DSA loss weights besides --dsa-weight")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="docs", help="folder for cjk_sensitivity.json / .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    # (label, condition, overrides); the first two are the references.
    base = dict(dsa_p=args.dsa_p, dsa_lam=args.dsa_lam, dsa_weight=args.dsa_weight)
    settings = [("lsr (no DSA)", "lsr", base),
                (f"reference p={args.dsa_p:g} λ={args.dsa_lam:g} w={args.dsa_weight:g}",
                 "lsr-dsa", base)]
    settings += [(f"p={v:g}", "lsr-dsa", {**base, "dsa_p": v}) for v in floats(args.ps)]
    settings += [(f"λ={v:g}", "lsr-dsa", {**base, "dsa_lam": v}) for v in floats(args.lams)]
    settings += [(f"w={v:g}", "lsr-dsa", {**base, "dsa_weight": v})
                 for v in floats(args.weights)]
    t0 = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    split = load_split(args, log=log)
    results = []
    for label, cond, over in settings:
        for seed in seeds:
            r = run_one(split, cond, seed, args, log=log, **over)
            r["setting"] = label
            results.append(r)
    rows = summarise(results, ("setting",))
    for row, (_, cond, over) in zip(rows, settings, strict=True):
        row["command"] = shlex.join(
            ["python", "-m", "experiments.cjk_table", *argv_without_sweep(argv),
             "--conditions", cond, "--seeds", args.seeds, "--dsa-p", f"{over['dsa_p']:g}",
             "--dsa-lam", f"{over['dsa_lam']:g}", "--dsa-weight", f"{over['dsa_weight']:g}",
             "--steps", str(args.steps), "--out", "runs/one-row"])
    report = {"args": vars(args), "rows": rows, "runs": results, "seconds": time.time() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cjk_sensitivity.json").write_text(json.dumps(report, indent=1, default=float))
    table = markdown_table(rows, first="setting")
    (out / "cjk_sensitivity.md").write_text(table)
    print(table, flush=True)
    print(f"wrote {out / 'cjk_sensitivity.json'} ({report['seconds']:.0f} s)", flush=True)
    return report


def argv_without_sweep(argv: list[str]) -> list[str]:
    """`argv` minus the options this script owns or that a row sets itself."""
    own = {"--ps", "--lams", "--weights", "--seeds", "--out", "--dsa-p", "--dsa-lam",
           "--dsa-weight", "--steps"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in own:
            skip = "=" not in a
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()

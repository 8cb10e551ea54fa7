"""Sensitivity to the DSA parameters on the CJK data (the paper's parameter study, smaller
budget): one parameter varied at a time around the base config's values, in one
`loss.sequence_mode` (`--mode`); the mode without DSA is the reference row.

    python -m experiments.cjk_sensitivity --mode sequence_classes --n-a 100 \
        --out docs/results/sensitivity                         # the published table

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
    ap.add_argument("--mode", default="lsr", help="loss.sequence_mode of every row")
    ap.add_argument("--ps", default="0.002,0.05", help="DSA p values besides the config's")
    ap.add_argument("--lams", default="0.25,0.75", help="DSA lambda values besides the config's")
    ap.add_argument("--weights", default="0.01,0.16",
                    help="DSA loss weights besides the config's")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/cjk-sensitivity",
                    help="folder for cjk_sensitivity.json / .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    # (label, overrides); the first two are the references.
    settings = [(f"{args.mode} (no DSA)", ["loss.dsa_weight=0"]), (f"{args.mode} + DSA", [])]
    settings += [(f"p={v:g}", [f"loss.dsa_p={v}"]) for v in floats(args.ps)]
    settings += [(f"λ={v:g}", [f"loss.dsa_lambda={v}"]) for v in floats(args.lams)]
    settings += [(f"w={v:g}", [f"loss.dsa_weight={v}"]) for v in floats(args.weights)]
    t0 = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    split = load_split(args, log=log)
    results = []
    for label, over in settings:
        for seed in seeds:
            r = run_one(split, args.mode, seed, args, over, log=log)
            r["setting"] = label
            results.append(r)
    rows = summarise(results, ("setting",))
    for row, (_, over) in zip(rows, settings, strict=True):
        row["command"] = shlex.join(
            ["python", "-m", "experiments.cjk_table", *argv_without_sweep(argv),
             "--conditions", args.mode, "--seeds", args.seeds,
             *[x for o in over for x in ("--set", o)], "--out", "runs/one-row"])
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
    own = {"--ps", "--lams", "--weights", "--seeds", "--out", "--mode"}
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

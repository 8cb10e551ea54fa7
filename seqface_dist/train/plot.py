"""``seqface plot RUN``: a run's curves as one PNG, from its history.

    seqface plot runs/local-cpu                 # -> runs/local-cpu/curves.png
    seqface plot s3://bucket/runs/r1 --out r1.png

Four panels over the step: the loss terms, the learning rate (and A-Softmax's lambda),
the verification accuracy and TAR@FAR of the evaluations, and the throughput. Steps redone
after a restart are drawn once, from the attempt that counted; each resume is a dashed line.
"""

from __future__ import annotations

from pathlib import Path

from seqface_dist.train.history import latest_attempt_rows, read_history

LOSS_TERMS = ("total", "chief", "lsr", "dsa_pull", "dsa_push")


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the logged steps that carry a finite value of it."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and v == v and abs(v) != float("inf"):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def plot_history(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Write the four panels of ``rows`` (a history's lines) to the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = latest_attempt_rows(rows)
    if not logged:
        raise ValueError("the history has no logged steps yet")
    resumes = [r["step"] for r in rows if r.get("event") == "resumed"]
    eval_keys = sorted({k for r in logged for k in r
                        # eval/<set>/... (one set per eval.sets entry); eval_...: older runs
                        if k.startswith(("eval/", "eval_")) and
                        (k.endswith("accuracy") or "tar@far" in k)})
    panels = [("loss", LOSS_TERMS, "log"), ("learning rate, lambda", ("lr", "lambda"), "log"),
              ("verification", tuple(eval_keys), "linear"),
              ("throughput (samples/s)", ("samples_per_second",), "linear")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (name, keys, scale) in zip(axes.flat, panels, strict=True):
        drawn = False
        for key in keys:
            x, y = series(logged, key)
            if x:
                ax.plot(x, y, label=key)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center",
                    transform=ax.transAxes)
        elif scale == "log" and all(v > 0 for k in keys for v in series(logged, k)[1]):
            ax.set_yscale("log")
        for s in resumes:
            ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle(title + (f" ({len(resumes)} resume{'s' if len(resumes) != 1 else ''})"
                          if resumes else ""))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run: str, out: str | None = None) -> Path:
    """Plot the run at ``run`` (a run folder or history file, local or ``s3://``)."""
    rows = read_history(run)
    if out is None:
        if "://" in run:
            raise ValueError(f"{run}: name a local --out file for a run in object storage")
        base = Path(run)
        out = str((base.parent if base.suffix == ".jsonl" else base) / "curves.png")
    return plot_history(rows, out, title=run.rstrip("/").rsplit("/", 1)[-1])

"""A run's history (seqface_dist.train.history) on local and S3 storage, and its plot."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from seqface_dist.cli import main
from seqface_dist.train.history import History, latest_attempt_rows, read_history
from seqface_dist.train.plot import plot_history, series


def _step(step: int, total: float, **kw) -> dict:
    return {"step": step, "total": total, "chief": total / 2, "lr": 0.1, "lambda": 5.0,
            "samples_per_second": 100.0 + step, **kw}


def test_local_history_appends_lines_that_name_their_attempt(tmp_path):
    h = History(pafs.LocalFileSystem(), str(tmp_path / "run"), "aaaa0000")
    h.append(_step(2, 3.0))
    h.sync()  # a no-op on local storage
    again = History(pafs.LocalFileSystem(), str(tmp_path / "run"), "bbbb1111")
    again.append({"event": "resumed", "step": 2})
    rows = read_history(str(tmp_path / "run"))
    assert [r["attempt"] for r in rows] == ["aaaa0000", "bbbb1111"]
    assert read_history(str(tmp_path / "run" / "history.jsonl")) == rows


def test_s3_history_is_uploaded_and_continued_by_the_next_attempt():
    from seqface_dist.data.testing import local_s3

    with local_s3("bucket"):
        fs, run = pafs.FileSystem.from_uri("s3://bucket/runs/r1")
        first = History(fs, run, "aaaa0000")
        first.append(_step(2, 3.0))
        with pytest.raises(FileNotFoundError):
            read_history("s3://bucket/runs/r1")  # nothing uploaded before a sync
        first.sync()
        second = History(fs, run, "bbbb1111")  # a restarted rank 0, another process
        second.append({"event": "resumed", "step": 2})
        second.append(_step(4, 2.0))
        second.sync()
        rows = read_history("s3://bucket/runs/r1")
    assert [(r.get("step"), r["attempt"]) for r in rows] == [
        (2, "aaaa0000"), (2, "bbbb1111"), (4, "bbbb1111")]


def test_steps_redone_after_a_resume_count_once_from_the_later_attempt():
    rows = [_step(2, 5.0), _step(4, 4.0), _step(6, 3.9),  # killed after step 6
            {"event": "resumed", "step": 4}, _step(6, 3.0), _step(8, 2.0)]
    kept = latest_attempt_rows(rows)
    assert [r["step"] for r in kept] == [2, 4, 6, 8]
    assert series(kept, "total") == ([2, 4, 6, 8], [5.0, 4.0, 3.0, 2.0])
    assert series([_step(2, float("nan"))], "total") == ([], [])


def test_seqface_plot_writes_the_curves(tmp_path, capsys):
    rows = [_step(s, 5.0 / s, eval_accuracy=0.5 + s / 100) for s in (2, 4, 6)]
    rows += [{"event": "resumed", "step": 4}, _step(6, 0.7), _step(8, 0.6)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in capsys.readouterr().out
    with pytest.raises(ValueError, match="no logged steps"):
        plot_history([{"event": "resumed", "step": 2}], tmp_path / "x.png")
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no history.jsonl" in capsys.readouterr().err

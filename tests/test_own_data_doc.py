"""docs/own-data.md runs as written: every ``bash`` block, in order, in a fresh folder.

From folders (identities, video frames + a detector's boxes) to shards, a 2-worker Ray
run with two eval sets, curves, an export with ONNX, ``eval bin``, ``eval ijb`` and an
onnxruntime-only deployment snippet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_doc_has_runnable_blocks_for_every_stage():
    script = "\n".join(bash_blocks(DOC.read_text()))
    for command in ("seqface shards build identity-tree", "seqface shards tracks",
                    "seqface shards build sequence-tree", "seqface train",
                    "seqface export", "seqface eval bin", "seqface eval ijb",
                    "onnxruntime"):
        assert command in script, f"docs/own-data.md runs no {command!r}"


@pytest.mark.slow
def test_the_walkthrough_runs_end_to_end(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(DOC.read_text()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-6000:]}\n{proc.stderr[-6000:]}"
    work = tmp_path / "own-data-example"
    for path in ("shards/ids/manifest.json", "shards/seqs/manifest.json",
                 "runs/my-run/curves.png", "export/embedding.onnx", "export/model.json"):
        assert (work / path).is_file(), f"{path} missing"
    assert list((work / "runs/my-run/tensorboard").rglob("events.out.tfevents.*"))
    # Both eval sets were evaluated during training, each under its name.
    history = [json.loads(x) for x in (work / "runs/my-run/history.jsonl").read_text()
               .splitlines()]
    keys = set().union(*(row.keys() for row in history))
    assert {"eval/seen/accuracy", "eval/unseen/accuracy"} <= keys, sorted(keys)
    ijb = json.loads((work / "ijb.json").read_text())
    assert ijb, "eval ijb wrote no result"
    # The deployment snippet: a template's two images closer than another digit's.
    same, different = map(float, re.search(r"same (\S+)  different (\S+)", out).groups())
    assert same > different, out[-2000:]

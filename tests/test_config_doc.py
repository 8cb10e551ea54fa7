"""``seqface config``: the resolved tree with each key's doc, and the key reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from seqface_dist.config import Config, load_config
from seqface_dist.config_doc import key_docs, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_has_a_doc():
    docs = key_docs()
    defaults = Config().to_dict()
    assert docs.keys() == defaults.keys()
    missing = [f"{s}.{k}" for s, keys in defaults.items() for k in keys if not docs[s].get(k)]
    assert not missing, f"keys without a comment in config.py: {missing}"
    # A run of uncommented keys shares the block above it; a key's own comment is its own.
    assert "lambda_t" in docs["loss"]["lambda_power"]
    assert docs["loss"]["arcface_margin"] == "[0, pi)"


def test_the_committed_reference_is_current():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == reference_markdown(), \
        "regenerate: seqface config --reference > docs/config-reference.md"


def test_the_printed_tree_is_the_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "seqface_dist.cli", "config", "--show",
                           "--config",
                           "configs/local-cpu.yaml", "optim.lr=0.05", "data.flip=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    want = load_config(ROOT / "configs/local-cpu.yaml", ["optim.lr=0.05", "data.flip=false"])
    assert yaml.safe_load(proc.stdout) == want.to_dict()
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("flip:"))
    assert line.endswith("# random horizontal flip of training images"), line


def test_a_bad_override_is_refused_naming_the_key():
    proc = subprocess.run([sys.executable, "-m", "seqface_dist.cli", "config", "optim.lr=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr

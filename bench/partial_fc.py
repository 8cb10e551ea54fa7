"""insightface's Partial FC (PartialFC_V2 + the arcface_torch margin) as a benchmark column.

The code is read at run time from a snapshot of the public repository deepinsight/insightface
(``recognition/arcface_torch/partial_fc_v2.py`` and ``recognition/arcface_torch/losses.py``),
never vendored: no insightface code is committed here. The snapshot is either a (bare) git
directory, read with ``git show HEAD:<path>``, or a checked-out folder (the repository root or
its ``recognition/arcface_torch``). The source text is patched in memory and ``exec``-ed into a
fresh module; the patches, each applied where its pattern occurs (the count is recorded in
``__patches__``), are:

1. ``.cuda(...)`` calls are removed (``x.cuda()`` -> ``x``), so the sampled indices and the
   all-gather buffers stay on the CPU. Upstream, ``partial_fc_v2.py`` has six of them.
2. ``torch.cuda.amp.autocast(<arg>)`` -> ``torch.amp.autocast("cpu", enabled=<arg>)``: a
   no-op with ``fp16=False`` (the only setting used here), without the CUDA amp deprecation
   warning on every forward.

Nothing else is changed: ``losses.py`` has no CUDA use (its tensors follow ``logits.device``).

``partial_fc_worker`` times PartialFC_V2 on the same global batch per step as
``head_common.head_worker``. Partial FC has no sequences: it gets *all* B samples of
``global_batch``, with labels ``t % num_identities`` (identity labels unchanged, a sequence
sample folded onto an identity class), so its logits are the same B x N_id / R per rank as the
head's identity block and each rank keeps the equal local batch Partial FC requires. The margin
is the one ``train_v2.py`` builds by default: ``CombinedMarginLoss(64, 1.0, 0.5, 0.0)``
(ArcFace, m = 0.5, s = 64).
"""

from __future__ import annotations

import re
import subprocess
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

from bench.head_common import (
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    Setup,
    global_batch,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

ARCFACE_DIR = "recognition/arcface_torch"
PFC_FILE = f"{ARCFACE_DIR}/partial_fc_v2.py"
LOSSES_FILE = f"{ARCFACE_DIR}/losses.py"

# (name, pattern, replacement): applied with re.subn to every file read.
PATCHES = (
    ("drop .cuda()", re.compile(r"\.cuda\([^()]*\)"), ""),
    ("torch.cuda.amp.autocast -> torch.amp.autocast('cpu')",
     re.compile(r"torch\.cuda\.amp\.autocast\(([^()]*)\)"),
     r'torch.amp.autocast("cpu", enabled=\1)'),
)


def _is_git_dir(p: Path) -> bool:
    return (p / "HEAD").is_file() and (p / "objects").is_dir()


def snapshot_commit(snapshot: str) -> str | None:
    """The snapshot's HEAD commit when it is a git directory, else None."""
    p = Path(snapshot)
    if not _is_git_dir(p):
        return None
    return subprocess.run(["git", f"--git-dir={p}", "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def read_snapshot_file(snapshot: str, rel: str) -> str:
    """The text of ``rel`` (a path from the repository root) in the snapshot."""
    p = Path(snapshot)
    if not p.exists():
        raise FileNotFoundError(f"insightface snapshot {snapshot} does not exist")
    if _is_git_dir(p):
        proc = subprocess.run(["git", f"--git-dir={p}", "show", f"HEAD:{rel}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise FileNotFoundError(f"insightface snapshot {snapshot} has no {rel} at HEAD "
                                    f"(git: {proc.stderr.strip()})")
        return proc.stdout
    for cand in (p / rel, p / Path(rel).relative_to(ARCFACE_DIR)):
        if cand.is_file():
            return cand.read_text()
    raise FileNotFoundError(f"insightface snapshot {snapshot} has no {rel}")


def _patch(text: str, rel: str, applied: dict[str, int]) -> str:
    for name, pattern, repl in PATCHES:
        text, n = pattern.subn(repl, text)
        if n:
            applied[f"{rel}: {name}"] = n
    if re.search(r"\.cuda\b|device\s*=\s*['\"]cuda", text):
        raise RuntimeError(f"{rel} still uses CUDA after patching: update PATCHES")
    return text


def load_partial_fc(snapshot: str) -> types.ModuleType:
    """A fresh module with ``PartialFC_V2``, ``ArcFace``, ``CombinedMarginLoss`` (and the
    rest of both files), built from the snapshot's source patched for the CPU. Also sets
    ``__patches__`` ({"file: patch": count}) and ``__commit__`` (None for a folder)."""
    applied: dict[str, int] = {}
    mod = types.ModuleType("insightface_partial_fc")
    for rel in (LOSSES_FILE, PFC_FILE):  # losses first: same namespace, no imports between
        src = _patch(read_snapshot_file(snapshot, rel), rel, applied)
        exec(compile(src, f"<{snapshot}:{rel} (patched)>", "exec"), mod.__dict__)
    for name in ("PartialFC_V2", "ArcFace", "CombinedMarginLoss"):
        if not hasattr(mod, name):
            raise RuntimeError(f"insightface snapshot {snapshot} defines no {name}")
    mod.__patches__ = applied
    mod.__commit__ = snapshot_commit(snapshot)
    return mod


def arcface_margin(pfc_mod: types.ModuleType):
    """train_v2.py's default margin: CombinedMarginLoss(64, *margin_list=(1.0, 0.5, 0.0))."""
    return pfc_mod.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)


def partial_fc_batch(setup: Setup, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``global_batch`` with every label folded onto the N_id identity classes."""
    feats, t = global_batch(setup, step)
    return feats, t % setup.num_identities


def partial_fc_worker(rank: int, setup_d: dict, sample_rate: float, snapshot: str) -> dict:
    """Build this rank's PartialFC_V2 (a gloo group must be up), step it, report times/memory.

    Each step: this rank's slice of the global batch's features (requires_grad, standing in
    for the backbone output) and labels -> loss (Partial FC all-gathers embeddings and labels
    itself) -> backward -> SGD(lr, momentum, weight_decay) step over its parameters ->
    zero_grad, as arcface_torch's train_v2.py does."""
    setup = Setup(**setup_d)
    assert dist.is_initialized() and dist.get_world_size() == setup.world
    pfc_mod = load_partial_fc(snapshot)
    reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    pfc = pfc_mod.PartialFC_V2(arcface_margin(pfc_mod), setup.dim, setup.num_identities,
                               sample_rate, False)
    pfc.train()
    opt = torch.optim.SGD(params=[{"params": pfc.parameters()}], lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    build_s = time.perf_counter() - t0
    sl = slice(rank * setup.local_batch, (rank + 1) * setup.local_batch)
    times, cpu, losses = [], [], []
    for step in range(setup.warmup + setup.steps):
        feats, labels = partial_fc_batch(setup, step)
        local = feats[sl].clone().requires_grad_(True)
        local_labels = labels[sl].clone()  # forward squeezes its labels in place
        t0, u0 = time.perf_counter(), time.thread_time()
        loss = pfc(local, local_labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - u0)
    return {"rank": rank, "n_id_local": pfc.num_local, "num_sample": pfc.num_sample,
            "baseline_rss": base, "peak_rss": peak_rss_bytes(), "build_s": build_s,
            "step_s": times[setup.warmup:], "cpu_s": cpu[setup.warmup:], "losses": losses,
            "patches": pfc_mod.__patches__, "commit": pfc_mod.__commit__}

"""``seqface export``: a run checkpoint or an export -> safetensors + model.json + .pt2, and
with --onnx an ONNX graph that onnxruntime runs to the module's embeddings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from dist_util import run_ranks

from seqface_dist.cli import main
from seqface_dist.config import ModelConfig
from seqface_dist.eval.embed import embed_images, load_model
from seqface_dist.models import build_backbone

IMAGES = np.random.default_rng(5).integers(0, 256, size=(5, 32, 32, 1), dtype=np.uint8)


def _train_and_checkpoint(rank: int, world: int, out: str):
    """One DeepSpeed step of the smoke config, then a committed checkpoint (as the worker)."""
    from seqface_dist.train.checkpoint import STATE_FILE, RunState, write_rank_files
    from seqface_dist.train.smoke import smoke_config
    from seqface_dist.train.worker import deepspeed_trainer

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    cfg = smoke_config(None, ["data.identities_per_batch=4", "data.sequences_per_batch=4"])
    trainer, spec = deepspeed_trainer(cfg, 8, 6, 4, world=1, device=torch.device("cpu"),
                                      sequence_weight=1.0)
    images = torch.randint(0, 256, (8, 32, 32, 1), dtype=torch.uint8)
    trainer.step(images, torch.tensor([0, 1, 2, 3, 6, 7, 8, 9]), 0)
    files = write_rank_files(out, engine=trainer.engine, head=trainer.head,
                             head_optimizer=trainer.head_opt, rank=0)
    state = RunState(step=1, head={"spec": spec, "layout": {}}, config=cfg.to_dict(),
                     files=files)
    (Path(out) / STATE_FILE).write_bytes(state.to_json())
    trainer.module.eval()
    return torch.from_numpy(embed_images(trainer.module, IMAGES, progress=False))


def test_export_a_checkpoint_with_onnx_matching_the_module(tmp_path, capsys):
    run = tmp_path / "run"  # a run folder: the export reads its newest committed checkpoint
    (res,) = run_ranks(_train_and_checkpoint, 1, str(run / "checkpoint-000000001-0123abcd"),
                       timeout=300)
    (run / "checkpoint-000000002-0123abcd").mkdir()  # newer, never committed: passed over
    want = res["ok"].numpy()
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime matches the module to" in printed, printed
    assert {p.name for p in out.iterdir()} >= {"backbone.safetensors", "model.json",
                                              "embedding.pt2", "embedding.onnx"}
    # The export embeds like the trained module (weights read weights-only from the
    # engine's file, the model from state.json).
    np.testing.assert_allclose(embed_images(load_model(out), IMAGES, progress=False), want,
                               rtol=1e-5, atol=1e-6)
    # ONNX, run by onnxruntime on a batch size it was not traced with.
    import onnxruntime

    x = torch.randn(7, 1, 32, 32)
    session = onnxruntime.InferenceSession(str(out / "embedding.onnx"),
                                           providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = load_model(out).eval()(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # The .pt2 program, loaded the one-line way the docs give, is in inference mode.
    program = torch.export.load(str(out / "embedding.pt2")).module()
    with torch.no_grad():
        np.testing.assert_allclose(program(x).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_export_of_an_export_and_bad_sources(tmp_path, capsys):
    from seqface_dist.train.export import export_embedding

    cfg = ModelConfig(backbone="tiny", embedding_dim=8, input_size=[16, 16], in_channels=1)
    torch.manual_seed(1)
    net = build_backbone(cfg).eval()
    export_embedding(net, cfg, tmp_path / "a")
    assert main(["export", str(tmp_path / "a" / "backbone.safetensors"), "--out",
                 str(tmp_path / "b")]) == 0
    imgs = IMAGES[:, :16, :16]
    np.testing.assert_allclose(embed_images(load_model(tmp_path / "b"), imgs, progress=False),
                               embed_images(net, imgs, progress=False), rtol=1e-6)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert "neither a run checkpoint" in capsys.readouterr().err

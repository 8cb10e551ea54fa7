"""``train.init_from``: a new run's backbone from a run checkpoint, an export, or an
insightface arcface_torch iresnet ``.pth`` (a generated arcface-layout state dict: the
layout is built here from our iresnet50 by the inverse key mapping; no insightface code
is vendored). Every key and shape checked; nothing unpickled."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from dist_util import run_ranks

from seqface_dist.config import ConfigError, ModelConfig
from seqface_dist.models import build_backbone
from seqface_dist.train.init_from import (
    ARCFACE_RULES,
    InitFromError,
    arcface_to_seqface,
    load_init_from,
    seqface_to_arcface,
)
from seqface_dist.train.smoke import smoke_config
from seqface_dist.train.step import local_trainer

ARC_CFG = ModelConfig(backbone="iresnet50", embedding_dim=512, input_size=[112, 112],
                      in_channels=3)


def _randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor of the state dict (BatchNorm statistics too) set to random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) * 0.2 + (0.9 if "running_var" in k
                                                                  else -0.1))
            else:
                v.fill_(seed)
    return net


@pytest.fixture(scope="module")
def arcface_pth(tmp_path_factory) -> tuple[Path, dict]:
    """An arcface_torch iresnet50 checkpoint as ``torch.save(backbone.state_dict())`` writes
    it (names: conv1, bn1, prelu, layer1..4, bn2, fc, features), and our weights."""
    ours = _randomised(build_backbone(ARC_CFG), 1).state_dict()
    arc = {seqface_to_arcface(k): v.clone() for k, v in ours.items()}
    path = tmp_path_factory.mktemp("arc") / "model.pt"
    torch.save(arc, path)
    return path, ours


def test_the_arcface_layout_differs_and_four_rules_map_every_key(arcface_pth):
    path, ours = arcface_pth
    arc = torch.load(path, weights_only=True)
    assert len(arc) == len(ours) > 400
    shared = set(arc) & set(ours)
    assert len(shared) < 20  # only bn2, fc, features are named alike
    assert {k.split(".")[0] for k in arc} == {"conv1", "bn1", "prelu", "layer1", "layer2",
                                              "layer3", "layer4", "bn2", "fc", "features"}
    assert len(ARCFACE_RULES) == 4
    mapped = {arcface_to_seqface(k): v for k, v in arc.items()}
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    # The arcface_torch names of a few keys, as its iresnet.py builds them.
    assert arcface_to_seqface("layer3.13.bn3.running_mean") == "stages.2.13.bn3.running_mean"
    assert arcface_to_seqface("layer1.0.downsample.0.weight") == "stages.0.0.downsample.0.weight"
    assert arcface_to_seqface("prelu.weight") == "stem.2.weight"
    assert arcface_to_seqface("layer2.0.prelu.weight") == "stages.1.0.prelu.weight"


def test_arcface_weights_load_and_give_identical_outputs(arcface_pth, tmp_path):
    path, ours = arcface_pth
    reference = build_backbone(ARC_CFG)
    reference.load_state_dict(ours)
    net = _randomised(build_backbone(ARC_CFG), 2)
    said = load_init_from(net, str(path), ARC_CFG)
    assert "arcface_torch iresnet" in said
    for k, v in net.state_dict().items():
        assert torch.equal(v, ours[k]), k
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference.eval()(x), rtol=0, atol=0)
    # Saved from a DDP wrapper: every key under "module.".
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in torch.load(path, weights_only=True).items()}, ddp)
    again = build_backbone(ARC_CFG)
    load_init_from(again, str(ddp), ARC_CFG)
    assert all(torch.equal(v, ours[k]) for k, v in again.state_dict().items())


def test_a_mismatch_lists_missing_unexpected_and_shape_mismatched_keys(arcface_pth, tmp_path):
    path, _ = arcface_pth
    arc = torch.load(path, weights_only=True)
    del arc["layer4.2.bn3.running_var"]
    arc["fc.extra"] = torch.zeros(1)
    arc["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    bad = tmp_path / "bad.pth"
    torch.save(arc, bad)
    with pytest.raises(InitFromError) as e:
        load_init_from(build_backbone(ARC_CFG), str(bad), ARC_CFG)
    msg = str(e.value)
    assert "1 missing: stages.3.2.bn3.running_var" in msg
    assert "1 unexpected: fc.extra" in msg
    assert "1 shape mismatch: stages.0.0.conv1.weight (64, 64, 5, 5) (the backbone has " \
           "(64, 64, 3, 3))" in msg
    # Another input size: arcface's FC expects 7x7 maps (112x112 images).
    other = ModelConfig(backbone="iresnet50", embedding_dim=512, input_size=[112, 96],
                        in_channels=3)
    with pytest.raises(InitFromError, match=r"shape mismatch: fc\.weight"):
        load_init_from(build_backbone(other), str(path), other)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pth_holding_more_than_weights_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, evil)
    with pytest.raises(InitFromError, match="refused: it holds more than weights"):
        load_init_from(build_backbone(ARC_CFG), str(evil), ARC_CFG)
    assert not marker.exists()


def _tiny_cfg(*extra: str):
    return smoke_config(None, list(extra))


def test_an_export_starts_a_new_run(tmp_path):
    from seqface_dist.train.export import export_embedding

    cfg = _tiny_cfg()
    src = _randomised(build_backbone(cfg.model), 3)
    export_embedding(src, cfg.model, tmp_path / "export")
    run = _tiny_cfg(f"train.init_from={tmp_path / 'export'}")
    trainer = local_trainer(run, 6, 4)  # the smoke path: the same init_backbone
    for (k, v), w in zip(trainer.module.state_dict().items(), src.state_dict().values(),
                         strict=True):
        assert torch.equal(v, w), k
    assert trainer.head_opt.state == {} and trainer.backbone_opt.state == {}  # fresh
    # The weights file itself, and a model that differs: refused naming the key.
    net = build_backbone(cfg.model)
    assert "export" in load_init_from(net, str(tmp_path / "export" / "backbone.safetensors"),
                                      cfg.model)
    wider = _tiny_cfg("model.embedding_dim=16")
    with pytest.raises(InitFromError, match="model.embedding_dim is 32, this run's is 16"):
        load_init_from(build_backbone(wider.model), str(tmp_path / "export"), wider.model)


def _checkpoint(rank: int, world: int, out: str) -> dict:
    """A committed run checkpoint written by a real DeepSpeed engine after one step."""
    from seqface_dist.train.checkpoint import STATE_FILE, RunState, write_rank_files
    from seqface_dist.train.worker import deepspeed_trainer

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    cfg = _tiny_cfg("data.identities_per_batch=4", "data.sequences_per_batch=4")
    trainer, spec = deepspeed_trainer(cfg, 8, 6, 4, world=world, device=torch.device("cpu"),
                                      sequence_weight=1.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 32, 32, 1), generator=g, dtype=torch.uint8)
    trainer.step(images, torch.tensor([0, 1, 2, 5, 6, 7, 9, 6]), 0)
    files = write_rank_files(out, engine=trainer.engine, head=trainer.head,
                             head_optimizer=trainer.head_opt, rank=rank)
    state = RunState(step=1, world_size=world, head={"spec": spec, "layout": {}},
                     config=cfg.to_dict(), files=files)
    (Path(out) / STATE_FILE).write_bytes(state.to_json())
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def test_a_run_checkpoint_starts_a_new_run_and_validation_guards_the_path(tmp_path):
    ckpt = tmp_path / "ckpt"
    (r,) = run_ranks(_checkpoint, 1, str(ckpt), timeout=300)
    assert "ok" in r, r.get("trace")
    def loads_the_checkpoint(source: Path, kind: str) -> None:
        cfg = _tiny_cfg(f"train.init_from={source}")
        net = build_backbone(cfg.model)
        assert f"({kind}," in load_init_from(net, cfg.train.init_from, cfg.model)
        for k, v in net.state_dict().items():
            assert torch.equal(v, r["ok"][k]), k

    loads_the_checkpoint(ckpt, "run checkpoint")
    run = tmp_path / "run"  # a run folder: its newest committed checkpoint
    shutil.copytree(ckpt, run / "checkpoint-000000001-0123abcd")
    loads_the_checkpoint(run, "run")
    # A checkpoint changed after its commit is refused (its hashes are checked).
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    engine_file = next((broken / "engine").rglob("*model_states.pt"))
    engine_file.write_bytes(engine_file.read_bytes()[:-10])
    model = _tiny_cfg().model
    with pytest.raises(Exception, match="engine"):
        load_init_from(build_backbone(model), str(broken), model)


def test_init_from_is_validated_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from: .*does not exist"):
        _tiny_cfg(f"train.init_from={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="train.init_from: .*neither a run \\(no checkpoint"):
        _tiny_cfg(f"train.init_from={tmp_path / 'empty'}")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ConfigError, match="train.init_from: .*must be an arcface_torch"):
        _tiny_cfg(f"train.init_from={tmp_path / 'w.txt'}")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="train.init_from: cannot be set together with "
                                          "train.resume_from"):
        _tiny_cfg(f"train.init_from={tmp_path / 'w.pth'}",
                  f"train.resume_from={tmp_path}")
    assert _tiny_cfg(f"train.init_from={tmp_path / 'w.pth'}").train.init_from == \
        str(tmp_path / "w.pth")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_ray_run_from_an_export_with_accumulation_and_a_deepspeed_json(shards, tmp_path):
    """The plumbing end to end on 2 Ray workers: init_from (an export), 2 micro-batches per
    step, the user's DeepSpeed JSON (ZeRO stage overridden)."""
    import json

    from train_util import history, train_cfg

    from seqface_dist.config import config_from_dict
    from seqface_dist.train.checkpoint import check_complete
    from seqface_dist.train.driver import local_ray, run
    from seqface_dist.train.export import export_embedding

    base = config_from_dict(train_cfg(shards, tmp_path, "x"))
    export_embedding(_randomised(build_backbone(base.model), 4), base.model, tmp_path / "exp")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 50000},
                              "steps_per_print": 1000}))
    cfg = config_from_dict(train_cfg(
        shards, tmp_path / "runs", "init-acc", optim__max_steps=10,
        train__init_from=str(tmp_path / "exp"), train__gradient_accumulation_steps=2,
        train__deepspeed_config=str(ds)))
    with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu"},
                   object_store_memory=256 << 20):
        result = run(cfg)
    hist = history(cfg)
    assert [r["step"] for r in hist] == [2, 4, 6, 8, 10]
    assert hist[-1]["samples_seen"] == 10 * 32 * 2  # a step is the whole batch of 32 per rank
    assert all(r["skipped_steps"] == 0 for r in hist)
    assert check_complete(result.checkpoint.path).step == 10


def test_init_from_and_deepspeed_config_read_from_s3(tmp_path):
    """Both paths may be s3:// (pyarrow's filesystem, like the checkpoints), on a real S3
    HTTP server on loopback."""
    import json

    import pyarrow.fs as pafs

    from seqface_dist.data.testing import local_s3
    from seqface_dist.train.export import export_embedding
    from seqface_dist.train.worker import ds_config

    cfg = _tiny_cfg()
    src = _randomised(build_backbone(cfg.model), 5)
    export_embedding(src, cfg.model, tmp_path / "export")
    (tmp_path / "ds.json").write_text(json.dumps({"steps_per_print": 9}))
    with local_s3("bucket"):
        fs, _ = pafs.FileSystem.from_uri("s3://bucket/x")
        pafs.copy_files(str(tmp_path / "export"), "bucket/models/export",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        pafs.copy_files(str(tmp_path / "ds.json"), "bucket/ds.json",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        run = _tiny_cfg("train.init_from=s3://bucket/models/export",
                        "train.deepspeed_config=s3://bucket/ds.json")
        assert ds_config(run, 8)[0]["steps_per_print"] == 9
        net = build_backbone(run.model)
        assert "export" in load_init_from(net, run.train.init_from, run.model)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     src.state_dict().values(), strict=True))
        with pytest.raises(ConfigError, match="train.init_from: .*does not exist"):
            _tiny_cfg("train.init_from=s3://bucket/models/nothing")
        with pytest.raises(ConfigError, match="train.deepspeed_config: .*cannot read"):
            _tiny_cfg("train.deepspeed_config=s3://bucket/nothing.json")

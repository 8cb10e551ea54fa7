"""The ready configs: each one loads, and the head accepts every loss option it sets
(nothing the config accepts is refused after Ray starts); the demo uses the default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqface_dist.config import CONFIG_DIR, ConfigError, LossConfig, load_named
from seqface_dist.parallel import HeadSpec, PartitionedHead, SoloComm
from seqface_dist.train.demo import demo_config

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_ready_configs_are_there():
    assert {"local-cpu", "reference", "smoke", "cluster-8gpu"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_its_head_builds_and_steps(name):
    cfg = load_named(name)
    spec = HeadSpec(num_identities=9, num_sequences=5, dim=cfg.model.embedding_dim)
    head = PartitionedHead(spec, cfg.loss, SoloComm(1, 2))
    feats = torch.randn(4, spec.dim, requires_grad=True)
    out = head(feats, torch.tensor([0, 4, 9, 13]), step=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and feats.grad is not None


def test_every_ready_config_but_the_reference_uses_the_default_sequence_mode():
    default = LossConfig().sequence_mode
    for name in CONFIGS:
        want = "lsr" if name == "reference" else default
        assert load_named(name).loss.sequence_mode == want, name


def test_reference_preset_holds_the_authors_recipe():
    ref = load_named("reference")
    assert ref.loss.reference_margin_grad and ref.loss.weight_renorm
    assert ref.loss.center_init == "xavier" and ref.loss.center_lr < 0
    assert (ref.optim.lr, ref.optim.momentum, ref.optim.weight_decay) == (0.01, 0.9, 5e-4)
    assert (ref.data.identities_per_batch, ref.data.sequences_per_batch) == (32, 32)
    assert (ref.loss.dsa_p, ref.loss.dsa_weight, ref.loss.dsa_lambda) == (0.01, 0.04, 0.5)


def test_unknown_named_config_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="local-cpu"):
        load_named("no-such-config")


def test_demo_trains_from_local_cpu_and_its_baseline_has_the_same_labeled_budget(tmp_path):
    paths = {"ids": tmp_path / "ids", "seqs": tmp_path / "seqs", "pairs": tmp_path / "p.bin"}
    cfg = demo_config(tmp_path, paths, steps=50, workers=2)
    base = demo_config(tmp_path, paths, steps=50, workers=2, sequences=False)
    local = load_named("local-cpu")
    assert cfg.loss == local.loss and cfg.model == local.model
    assert cfg.data.sequences_per_batch == local.data.sequences_per_batch > 0
    assert base.data.sequences_per_batch == 0 and base.data.sequence_shards == []
    assert base.data.identities_per_batch == cfg.data.identities_per_batch
    assert base.optim == cfg.optim
    assert Path(cfg.data.identity_shards[0]) == paths["ids"]


@pytest.mark.parametrize("override", ["optim.lr=.inf", "loss.scale=.nan", "loss.dsa_alpha=-.inf",
                                      "loss.center_lr=nan", "loss.dsa_weight=1e999"])
def test_non_finite_numbers_are_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: must be a finite number"):
        load_named("local-cpu", [override])

"""Embeddings (flip test, preprocessing, model loading), the model-level protocol and CLI."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from seqface_dist.cli import main
from seqface_dist.config import ModelConfig
from seqface_dist.eval.embed import UntrustedModelError, embed_images, load_model
from seqface_dist.eval.evaluate import evaluate_model, load_verification_set


class FlatNet(nn.Module):
    """A linear map of the flattened image, plus dropout (to see eval mode)."""

    def __init__(self, h: int = 4, w: int = 3, d: int = 5) -> None:
        super().__init__()
        self.input_size = (h, w)
        self.in_channels = 3
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * h * w, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.flatten(1)))


def test_embed_flip_matches_hand_computation() -> None:
    torch.manual_seed(0)
    net = FlatNet()
    net.train()  # embed must switch to eval (no dropout) and restore this afterwards
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 4, 3, 3), dtype=np.uint8)
    W = net.fc.weight.detach().double().numpy()
    b = net.fc.bias.detach().double().numpy()

    def hand(a: np.ndarray) -> np.ndarray:  # (H, W, C) uint8 -> feature
        x = (a.astype(np.float64) - 127.5) / 128.0
        return W @ x.transpose(2, 0, 1).reshape(-1) + b

    want = np.stack([hand(a) + hand(a[:, ::-1]) for a in imgs])
    got = embed_images(net, imgs, flip=True, batch_size=3, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = embed_images(net, imgs, flip=False, batch_size=3, progress=False)
    np.testing.assert_allclose(plain, np.stack([hand(a) for a in imgs]), rtol=1e-5, atol=1e-5)
    assert net.training


def test_embed_decodes_and_resizes_files_and_bytes(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = FlatNet()
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "a.png")
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    small = np.asarray(Image.fromarray(big).resize((3, 4), Image.BILINEAR))
    want = embed_images(net, small[None], progress=False)
    got = embed_images(net, [tmp_path / "a.png", buf.getvalue()], progress=False)
    np.testing.assert_allclose(got, np.repeat(want, 2, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="cannot decode image"):
        embed_images(net, [b"garbage"], progress=False)


def test_load_model_torchscript_and_safetensors(tmp_path: Path) -> None:
    cfg = ModelConfig(backbone="tiny", embedding_dim=8, input_size=[16, 16], in_channels=3)
    from seqface_dist.models import build_backbone

    torch.manual_seed(2)
    net = build_backbone(cfg).eval()
    imgs = np.random.default_rng(2).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    want = embed_images(net, imgs, progress=False)
    # Weights saved with a wrapper prefix, as a DDP/DeepSpeed module would name them.
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    net2 = load_model(tmp_path / "w.safetensors", cfg)
    np.testing.assert_allclose(embed_images(net2, imgs, progress=False), want, rtol=1e-5)
    x = torch.zeros(2, 3, 16, 16)
    torch.jit.trace(net, x).save(str(tmp_path / "m.pt"))
    with pytest.raises(UntrustedModelError, match="can run code"):
        load_model(tmp_path / "m.pt")  # TorchScript: only when trusted
    net3 = load_model(tmp_path / "m.pt", trust_code=True)
    np.testing.assert_allclose(embed_images(net3, imgs, input_size=(16, 16), progress=False),
                               want, rtol=1e-5)
    dyn = {"x": {0: torch.export.Dim.AUTO}}  # any batch size
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=dyn), str(tmp_path / "m.pt2"))
    with pytest.raises(UntrustedModelError, match="torch.export file can run code"):
        load_model(tmp_path / "m.pt2")
    net4 = load_model(tmp_path / "m.pt2", trust_code=True)
    np.testing.assert_allclose(embed_images(net4, imgs, input_size=(16, 16), progress=False),
                               want, rtol=1e-5)
    with pytest.raises(ValueError, match="name the backbone"):
        load_model(tmp_path / "w.safetensors")
    bad = ModelConfig(backbone="tiny", embedding_dim=4, input_size=[16, 16])
    with pytest.raises(ValueError, match="do not fit backbone 'tiny'"):
        load_model(tmp_path / "w.safetensors", bad)


class ColorNet(nn.Module):
    """Feature = the mean colour: images of one colour match, of different colours don't."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size = (8, 8)
        self.in_channels = 3
        self.w = nn.Parameter(torch.eye(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.w


# Far apart in cosine after (x - 127.5) / 128: each identity has its own sign pattern.
COLORS = [(250, 5, 5), (5, 250, 5), (5, 5, 250), (250, 250, 5), (5, 250, 250), (250, 5, 250)]


def _jpeg(rgb: tuple[int, int, int], seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(-4, 5, size=(8, 8, 3))
    arr = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _bin_file(path: Path, n_pairs: int = 40) -> np.ndarray:
    rng = np.random.default_rng(5)
    images, same = [], []
    for i in range(n_pairs):
        a = int(rng.integers(6))
        b = a if i % 2 == 0 else (a + int(rng.integers(1, 6))) % 6
        images += [_jpeg(COLORS[a], 2 * i), _jpeg(COLORS[b], 2 * i + 1)]
        same.append(a == b)
    path.write_bytes(pickle.dumps((images, np.array(same)), protocol=4))
    return np.array(same)


def test_evaluate_model_on_bin_and_pairs(tmp_path: Path) -> None:
    same = _bin_file(tmp_path / "colors.bin")
    vset = load_verification_set(tmp_path / "colors.bin")
    net = ColorNet()
    res = evaluate_model(net, vset, flip=True, progress=False)
    assert res.accuracy == 1.0 and res.auc == 1.0 and res.n_genuine == int(same.sum())
    # Pair the images wrongly (shift by one) and the accuracy must drop: the indices matter.
    vset.idx2 = np.roll(vset.idx2, 1)
    assert evaluate_model(net, vset, progress=False).accuracy < 0.9

    # The same kind of set as pairs.txt + image folders; each image used twice is embedded once.
    root = tmp_path / "lfw"
    for k, rgb in enumerate(COLORS):
        (root / f"P{k}").mkdir(parents=True)
        for j in (1, 2):
            (root / f"P{k}" / f"P{k}_{j:04d}.jpg").write_bytes(_jpeg(rgb, 100 * k + j))
    lines = ["2 3"]
    for fold in range(2):
        lines += [f"P{k} 1 2" for k in range(3 * fold, 3 * fold + 3)]
        lines += [f"P{k} 1 P{(k + 1) % 6} 2" for k in range(3 * fold, 3 * fold + 3)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pset = load_verification_set(tmp_path / "pairs.txt", root)
    assert len(pset.images) == 12 and len(pset) == 12
    assert pset.folds.tolist() == [0] * 6 + [1] * 6
    assert evaluate_model(net, pset, progress=False).accuracy == 1.0


def test_cli_bin_pairs_and_malicious(tmp_path: Path, capsys) -> None:
    _bin_file(tmp_path / "colors.bin")
    torch.jit.script(ColorNet()).save(str(tmp_path / "m.pt"))
    rc = main(["eval", "bin", "--model", str(tmp_path / "m.pt"), "--bin",
               str(tmp_path / "colors.bin"), "--flip", "--trust-model", "--roc",
               str(tmp_path / "roc.png"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "10-fold accuracy: 1.0000 ± 0.0000" in out and "TAR@FAR=0.001" in out
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # Several sets at once (arcface_torch's lfw + cfp_fp + agedb_30): one line each.
    (tmp_path / "again.bin").write_bytes((tmp_path / "colors.bin").read_bytes())
    rc = main(["eval", "bin", "--model", str(tmp_path / "m.pt"), "--trust-model", "--bin",
               str(tmp_path / "colors.bin"), str(tmp_path / "again.bin"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "== colors\n" in out and "== again\n" in out, out
    assert out.splitlines()[-3:] == ["set     accuracy", "colors  1.0000 ± 0.0000",
                                     "again   1.0000 ± 0.0000"], out

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([b"x", b"y"], [Evil()])))
    rc = main(["eval", "bin", "--model", str(tmp_path / "m.pt"), "--trust-model", "--bin",
               str(tmp_path / "evil.bin"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to load global" in err and "system" in err
    assert not marker.exists()

    rc = main(["eval", "pairs", "--model", str(tmp_path / "m.pt"), "--trust-model", "--pairs",
               str(tmp_path / "nope.txt"), "--root", str(tmp_path)])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err


def test_an_export_loads_without_unpickling_and_planted_payloads_never_run(tmp_path, capsys):
    from seqface_dist.train.export import export_embedding

    cfg = ModelConfig(backbone="tiny", embedding_dim=8, input_size=[16, 16], in_channels=3)
    from seqface_dist.models import build_backbone

    torch.manual_seed(3)
    net = build_backbone(cfg).eval()
    imgs = np.random.default_rng(3).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    want = embed_images(net, imgs, progress=False)
    export = tmp_path / "export"
    export_embedding(net, cfg, export)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    # The program replaced by a payload: the folder, and the .pt2 named directly, still
    # load from model.json + backbone.safetensors; the payload is never opened.
    torch.save({"program": Evil()}, export / "embedding.pt2")
    for target in (export, export / "embedding.pt2", export / "backbone.safetensors"):
        got = embed_images(load_model(target), imgs, progress=False)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    rc = main(["eval", "bin", "--model", str(export), "--bin", str(tmp_path / "none.bin")])
    assert rc == 2 and "none.bin" in capsys.readouterr().err  # no --backbone needed
    # The weights replaced by a payload: refused, nothing runs.
    (export / "backbone.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception, match="header"):
        load_model(export)
    assert not marker.exists()

"""The pairs.txt and .bin readers on small files written here, including a malicious .bin."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seqface_dist.eval.pairs import UnsafePickleError, read_bin, read_lfw_pairs


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _lfw_tree(root: Path) -> None:
    for name, n in (("Ann_Lee", 3), ("Bo_Chen", 2)):
        (root / name).mkdir(parents=True)
        for k in range(1, n + 1):
            (root / name / f"{name}_{k:04d}.jpg").write_bytes(_jpeg((40 * k, 80, 120)))
    (root / "Cy_Ode").mkdir()
    Image.new("RGB", (12, 10), (9, 9, 9)).save(root / "Cy_Ode" / "Cy_Ode_0001.png")


def test_read_lfw_pairs(tmp_path: Path) -> None:
    root = tmp_path / "lfw"
    _lfw_tree(root)
    txt = tmp_path / "pairs.txt"
    # 2 folds x 1 pair per fold: matched then mismatched in each fold; tabs like LFW's.
    txt.write_text("2\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tBo_Chen\t1\n"
                   "Bo_Chen 1 2\nAnn_Lee 3 Cy_Ode 1\n")
    pl = read_lfw_pairs(txt, root)
    assert len(pl) == 4
    assert pl.issame.tolist() == [True, False, True, False]
    assert pl.folds.tolist() == [0, 0, 1, 1]
    assert pl.path1[0] == root / "Ann_Lee" / "Ann_Lee_0001.jpg"
    assert pl.path2[0] == root / "Ann_Lee" / "Ann_Lee_0002.jpg"
    assert pl.path2[1] == root / "Bo_Chen" / "Bo_Chen_0001.jpg"
    assert pl.path1[3] == root / "Ann_Lee" / "Ann_Lee_0003.jpg"
    assert pl.path2[3] == root / "Cy_Ode" / "Cy_Ode_0001.png"  # other extension found
    with Image.open(pl.path2[3]) as im:
        assert im.size == (12, 10)


def test_read_lfw_pairs_errors_name_the_line(tmp_path: Path) -> None:
    root = tmp_path / "lfw"
    _lfw_tree(root)
    txt = tmp_path / "pairs.txt"
    txt.write_text("1 1\nAnn_Lee 1 2\nAnn_Lee 1 Bo_Chen 9\n")
    with pytest.raises(FileNotFoundError, match=r"pairs.txt:3: image .*Bo_Chen_0009.jpg"):
        read_lfw_pairs(txt, root)
    assert len(read_lfw_pairs(txt, root, check_exists=False)) == 2
    txt.write_text("1 1\nAnn_Lee 1 2\nAnn_Lee one Bo_Chen 1\n")
    with pytest.raises(ValueError, match=r"pairs.txt:3: expected"):
        read_lfw_pairs(txt, root)
    txt.write_text("10 300\nAnn_Lee 1 2\n")
    with pytest.raises(ValueError, match="promises 6000 pair lines, found 1"):
        read_lfw_pairs(txt, root)
    txt.write_text("pairs\nAnn_Lee 1 2\n")
    with pytest.raises(ValueError, match="pairs.txt:1: header"):
        read_lfw_pairs(txt, root)


IMAGES = [_jpeg((200, 10, 10)), _jpeg((10, 200, 10)), _jpeg((10, 10, 200)),
          _jpeg((90, 90, 90))]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_read_bin_numpy_bool_array(tmp_path: Path, protocol: int) -> None:
    f = tmp_path / "set.bin"
    f.write_bytes(pickle.dumps((IMAGES, np.array([True, False])), protocol=protocol))
    b = read_bin(f)
    assert b.images == IMAGES
    assert b.issame.dtype == bool and b.issame.tolist() == [True, False]


def test_read_bin_list_of_bools_and_numpy_scalars(tmp_path: Path) -> None:
    f = tmp_path / "set.bin"
    f.write_bytes(pickle.dumps((IMAGES, [False, True]), protocol=pickle.HIGHEST_PROTOCOL))
    assert read_bin(f).issame.tolist() == [False, True]
    f.write_bytes(pickle.dumps((IMAGES, [np.bool_(True), np.bool_(False)]), protocol=2))
    assert read_bin(f).issame.tolist() == [True, False]


def test_read_bin_refuses_malformed_content(tmp_path: Path) -> None:
    f = tmp_path / "set.bin"
    f.write_bytes(pickle.dumps((IMAGES[:3], [True, False])))
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        read_bin(f)
    f.write_bytes(pickle.dumps((IMAGES, [True, "yes"])))
    with pytest.raises(ValueError, match="issame must hold booleans"):
        read_bin(f)
    f.write_bytes(pickle.dumps((IMAGES, np.array([0.5, 1.0]))))
    with pytest.raises(UnsafePickleError, match="dtype 'f8' refused"):
        read_bin(f)
    f.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable verification .bin"):
        read_bin(f)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "images", "issame"])
def test_read_bin_refuses_malicious_payload(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    payload = {"top": evil, "images": (IMAGES[:1] + [evil], [True]),
               "issame": (IMAGES, [True, evil])}[where]
    f = tmp_path / "evil.bin"
    f.write_bytes(pickle.dumps(payload, protocol=2))
    # Control: the same payload aimed at another file really runs under plain pickle.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control), protocol=2))
    assert control.exists()
    with pytest.raises(UnsafePickleError, match=r"evil.bin: refusing to load global "
                                                r"(posix|os|nt)\.system"):
        read_bin(f)
    assert not marker.exists()


def test_read_bin_refuses_object_arrays_and_builtins(tmp_path: Path) -> None:
    f = tmp_path / "obj.bin"
    f.write_bytes(pickle.dumps((IMAGES, np.array([True, None], dtype=object))))
    with pytest.raises(UnsafePickleError, match="dtype 'O8' refused"):
        read_bin(f)
    f.write_bytes(pickle.dumps((IMAGES, [True, False], print)))
    with pytest.raises(UnsafePickleError, match="builtins.print"):
        read_bin(f)


def test_read_bin_python2_pickle(tmp_path: Path) -> None:
    # The older public .bin files are Python 2 pickles: image data as ``str``
    # (SHORT_BINSTRING), which must come back as bytes. Hand-assembled opcodes:
    # PROTO 2, [ 'abc', 'def' ], [ True ], TUPLE2, STOP.
    raw = b"\x80\x02]q\x00(U\x03abcq\x01U\x03defq\x02e]q\x03\x88a\x86q\x04."
    f = tmp_path / "py2.bin"
    f.write_bytes(raw)
    b = read_bin(f)
    assert b.images == [b"abc", b"def"] and b.issame.tolist() == [True]

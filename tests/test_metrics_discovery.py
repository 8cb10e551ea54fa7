"""File-based service discovery: file_sd shape, atomic rewrites, target addresses."""

from __future__ import annotations

import json
import stat
import threading

import pytest

from seqface_dist.metrics import ServiceDiscoveryFile, read_sd_file, sd_path, target_address


def test_file_has_the_file_sd_shape_and_one_group_per_key(tmp_path):
    path = sd_path(tmp_path / "sd", "exp1")
    sd = ServiceDiscoveryFile(path)
    sd.register("rank00001", "10.0.0.6:41000", {"run": "exp1", "rank": "1", "node": "b"})
    sd.register("rank00000", "10.0.0.5:40000", {"run": "exp1", "rank": 0, "node": "a"})
    data = json.loads(path.read_text())
    assert data == [
        {"targets": ["10.0.0.5:40000"], "labels": {"run": "exp1", "rank": "0", "node": "a"}},
        {"targets": ["10.0.0.6:41000"], "labels": {"run": "exp1", "rank": "1", "node": "b"}},
    ]
    assert read_sd_file(path) == data
    # Prometheus may run as its own user: the file must be world-readable.
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044
    # A restarted rank re-registers on a new port: it replaces its entry.
    sd.register("rank00000", "10.0.0.7:40001", {"run": "exp1", "rank": "0", "node": "c"})
    assert [g["targets"] for g in read_sd_file(path)] == [["10.0.0.7:40001"], ["10.0.0.6:41000"]]
    sd.unregister("rank00001")
    assert len(read_sd_file(path)) == 1
    sd.remove()
    assert not path.exists()
    assert list((tmp_path / "sd").iterdir()) == []


def test_rewrites_are_atomic_for_a_concurrent_reader(tmp_path):
    path = tmp_path / "run.json"
    sd = ServiceDiscoveryFile(path)
    sd.register("k0", "127.0.0.1:1", {"run": "r"})
    stop = threading.Event()
    seen, errors, tmp_names = [], [], set()

    def reader():
        while not stop.is_set():
            try:
                seen.append(len(json.loads(path.read_text())))
            except Exception as e:  # a torn or missing file would land here
                errors.append(repr(e))
            # What a Prometheus glob would match: only the real file, never a temporary.
            tmp_names.update(p.name for p in tmp_path.glob("*.json"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(120):  # growing file: a torn read would be invalid JSON
            sd.register(f"k{i:04d}", f"127.0.0.1:{1000 + i}", {"run": "r", "rank": str(i)})
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert len(seen) > 3 and max(seen) <= 121
    assert tmp_names == {"run.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporaries left


def test_bad_targets_labels_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must end in .json"):
        ServiceDiscoveryFile(tmp_path / "run.yaml")
    sd = ServiceDiscoveryFile(tmp_path / "run.json")
    for bad in ("10.0.0.5", ":9000", "10.0.0.5:0", "10.0.0.5:http", "h:70000"):
        with pytest.raises(ValueError, match="expected host:port"):
            sd.register("k", bad)
    with pytest.raises(ValueError, match="not a valid Prometheus label name"):
        sd.register("k", "h:1", {"bad-name": "x"})
    with pytest.raises(ValueError, match="not a valid Prometheus label name"):
        sd.register("k", "h:1", {"__address__": "x"})
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: cannot read JSON"):
        read_sd_file(tmp_path / "broken.json")
    (tmp_path / "shape.json").write_text('[{"targets": []}]')
    with pytest.raises(ValueError, match=r"shape.json\[0\].targets"):
        read_sd_file(tmp_path / "shape.json")


def test_target_address_advertises_a_reachable_host():
    assert target_address("127.0.0.1", 9100) == "127.0.0.1:9100"
    assert target_address("0.0.0.0", 9100, "10.1.2.3") == "10.1.2.3:9100"
    assert target_address("::", 9100, "fd00::5") == "[fd00::5]:9100"
    wild = target_address("0.0.0.0", 9100)  # no advertise host: this machine's address
    assert not wild.startswith("0.0.0.0") and wild.endswith(":9100")

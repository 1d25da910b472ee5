import json
import os

import pytest

from astrid.provenance import atomic_path, file_sha256, provenance, write_json_atomic


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_path_keeps_old_file_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2')
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}


def test_provenance_record_and_checksum(tmp_path):
    record = provenance({"a": 1}, inputs=["x.fits"], seed=3)
    assert record["seed"] == 3 and record["inputs"] == ["x.fits"]
    assert record["config_hash"] == provenance({"a": 1})["config_hash"]
    assert record["config_hash"] != provenance({"a": 2})["config_hash"]
    path = write_json_atomic(tmp_path / "p.json", record)
    assert len(file_sha256(path)) == 64

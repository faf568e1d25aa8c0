"""Writing artefacts: atomic writes name the destination when they cannot write it, and a damaged
registry entry is reported by name without hiding the others."""

import json

import pytest

from latentforge.errors import LatentForgeError
from latentforge.registry import RegistryError, list_entries, show
from latentforge.storage import atomic_write_bytes


def test_an_unwritable_destination_is_named_and_leaves_nothing_behind(tmp_path):
    with pytest.raises(LatentForgeError, match=f"cannot write {tmp_path}: it is a folder, not a file name"):
        atomic_write_bytes(tmp_path, b"x")
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(LatentForgeError, match="afile is a file, not a folder"):
        atomic_write_bytes(tmp_path / "afile" / "x.png", b"x")
    assert (tmp_path / "afile").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no temporary files left
    assert atomic_write_bytes(tmp_path / "new" / "ok.bin", b"ok").read_bytes() == b"ok"


def _entry(root, name, content):
    (root / name).mkdir(parents=True)
    (root / name / "model.json").write_text(content)


def test_a_damaged_registry_entry_is_named_and_the_others_still_list(tmp_path, caplog):
    reg = tmp_path / "reg"
    _entry(reg, "good", json.dumps({"kind": "latentforge.registry_entry", "name": "good", "algorithm": "gan"}))
    _entry(reg, "torn", '{"kind": "latentforge.reg')
    _entry(reg, "listy", "[]")
    assert [e["name"] for e in list_entries(str(reg))] == ["good"]
    assert "'listy'" in caplog.text and "'torn'" in caplog.text and "--overwrite" in caplog.text
    with pytest.raises(RegistryError, match="model 'torn' in registry .* has a damaged model.json; promote its "
                                            "checkpoint again"):
        show(str(reg), "torn")
    with pytest.raises(RegistryError, match=r"no model 'other' .* \(models: good\)"):
        show(str(reg), "other")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RegistryError, match="is a file, not a folder"):
        list_entries(str(tmp_path / "afile"))

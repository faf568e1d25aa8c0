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


def test_an_appended_line_never_joins_a_torn_last_line(tmp_path):
    """A process killed mid-record leaves a line without its newline; the next record (a resumed
    run's) starts a line of its own, so every whole record still parses."""
    from latentforge.storage import append_line_uri

    log = tmp_path / "metrics.jsonl"
    append_line_uri(str(log), json.dumps({"step": 1}))
    with open(log, "ab") as f:
        f.write(b'{"step": 2, "d_lo')  # killed here
    append_line_uri(str(log), json.dumps({"step": 3}))
    append_line_uri(str(log), json.dumps({"step": 4}) + "\n")
    lines = log.read_text().splitlines()
    assert lines[0] == '{"step": 1}' and lines[1] == '{"step": 2, "d_lo' and [json.loads(x)["step"] for x in lines[2:]] == [3, 4]


def test_every_json_artefact_holds_null_for_nan(tmp_path):
    """A diverged run's NaN loss or a trial without a metric is written as null: the files stay
    JSON that jq, a browser or Starlette reads (json.dumps would write the bare token NaN)."""
    from latentforge.storage import atomic_write_json
    from latentforge.train.run_files import RunFiles

    def strict(token):
        raise AssertionError(f"{token} written")

    atomic_write_json(tmp_path / "a.json", {"best": float("nan"), "rows": [{"m": float("inf")}, (1.0, 2)]})
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=strict) == {"best": None, "rows": [{"m": None}, [1.0, 2]]}
    RunFiles(str(tmp_path / "run")).record({"step": 3, "d_loss": float("nan")})
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text(), parse_constant=strict) == {"step": 3, "d_loss": None}

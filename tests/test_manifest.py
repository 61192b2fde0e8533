"""core.manifest: the stage contract. Tampering and truncation are caught; freshness tracks inputs."""

from __future__ import annotations

import json
import os

import pytest

from nestling.core.errors import NestlingError
from nestling.core.manifest import (
    atomic_write_json,
    fingerprint,
    is_fresh,
    read_manifest,
    verify_files,
    write_manifest,
)


@pytest.fixture
def stage_dir(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "card.txt").write_text("hello")
    write_manifest(
        tmp_path,
        stage="export",
        config={"q": "q8_0"},
        inputs={"student": "abc"},
        files=["weights", "card.txt"],
        metrics={"accuracy": 0.5},
        variants={"x": {"engine": "gguf"}},
    )
    return tmp_path


def test_manifest_round_trip_lists_every_file_under_a_directory(stage_dir):
    m = read_manifest(stage_dir, stage="export")
    assert set(m["files"]) == {"weights/a.bin", "card.txt"}
    assert m["files"]["weights/a.bin"]["bytes"] == 2000
    assert m["variants"] == {"x": {"engine": "gguf"}}
    verify_files(stage_dir, m)
    verify_files(stage_dir, m, ["weights"])


def test_tampered_file_is_refused(stage_dir):
    p = stage_dir / "weights" / "a.bin"
    p.write_bytes(b"\x00\x02" * 1000)  # same size, different content
    with pytest.raises(NestlingError, match="sha256"):
        verify_files(stage_dir, read_manifest(stage_dir))


def test_truncated_file_is_refused(stage_dir):
    p = stage_dir / "weights" / "a.bin"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(NestlingError, match="truncated"):
        verify_files(stage_dir, read_manifest(stage_dir), ["weights/a.bin"])


def test_missing_and_unlisted_files_are_refused(stage_dir):
    (stage_dir / "card.txt").unlink()
    with pytest.raises(NestlingError, match="missing"):
        verify_files(stage_dir, read_manifest(stage_dir))
    with pytest.raises(NestlingError, match="not listed"):
        verify_files(stage_dir, read_manifest(stage_dir), ["other.bin"])


def test_bad_manifests_give_clear_errors(tmp_path):
    with pytest.raises(NestlingError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(NestlingError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(NestlingError, match="not a nestling"):
        read_manifest(tmp_path)


def test_wrong_stage_is_refused(stage_dir):
    with pytest.raises(NestlingError, match="expected 'train'"):
        read_manifest(stage_dir, stage="train")


def test_is_fresh_tracks_config_inputs_and_files(stage_dir):
    assert is_fresh(stage_dir, "export", {"q": "q8_0"}, {"student": "abc"})
    assert not is_fresh(stage_dir, "export", {"q": "q4_k_m"}, {"student": "abc"})
    assert not is_fresh(stage_dir, "export", {"q": "q8_0"}, {"student": "changed"})
    assert not is_fresh(stage_dir, "train", {"q": "q8_0"}, {"student": "abc"})
    (stage_dir / "card.txt").write_text("edited")
    assert not is_fresh(stage_dir, "export", {"q": "q8_0"}, {"student": "abc"})


def test_fingerprint_ignores_key_order_but_not_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_makes_an_ordinary_readable_file(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o044 == 0o044  # group/other can read, as with open()


def test_read_jsonl_names_the_bad_line_and_the_fix(tmp_path):
    from nestling.core.manifest import read_jsonl

    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{oops\n')
    with pytest.raises(NestlingError, match=r"rows.jsonl:4: not valid JSON .*; redo it"):
        read_jsonl(p, fix="redo it")
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    with pytest.raises(NestlingError, match="not found; redo it"):
        read_jsonl(tmp_path / "missing.jsonl", fix="redo it")


def test_outputs_get_the_umask_mode_and_importing_leaves_the_umask_alone(tmp_path):
    from nestling.core.manifest import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert os.umask(0o027) == 0o027  # nothing in between changed it
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_read_json_names_the_file_and_the_fix(tmp_path):
    from nestling.core.manifest import read_json, try_read_json

    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(NestlingError, match=r"x.json: not valid JSON .*; re-run"):
        read_json(bad)
    assert read_json(tmp_path / "missing.json", default={}) == {}
    with pytest.raises(NestlingError, match="missing.json: not found"):
        read_json(tmp_path / "missing.json")
    assert try_read_json(bad) is None


def test_a_cache_is_read_back_only_for_the_identity_it_was_computed_from(tmp_path):
    from nestling.core.manifest import read_cache, write_cache

    path = tmp_path / "teacher_vote.json"
    identity = {"teacher": "gguf:smollm2", "questions": [{"id": "q1"}]}
    assert read_cache(path, identity) is None  # nothing cached yet
    write_cache(path, identity, {"q1": "7"}, "labels", stage="eval-vote")
    assert read_cache(path, identity, "labels") == {"q1": "7"}
    assert read_cache(path, {**identity, "teacher": "hf:other"}, "labels") is None
    assert read_cache(path, identity) is None  # another field of the file is not the value
    write_cache(path, identity, {}, "labels")
    assert read_cache(path, identity, "labels") == {}  # an empty result is a hit, not a miss
    path.write_text('{"key": ')  # torn
    assert read_cache(path, identity, "labels") is None

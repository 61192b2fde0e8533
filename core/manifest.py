"""Stage manifests: the contract between distill -> export -> serve.

Every stage writes its output directory with a ``manifest.json`` beside it:

    {
      "format": "nestling/1",
      "stage": "traces" | "train" | "eval" | "export" | ...,
      "created": "2026-11-25T12:00:00Z",
      "config": {...},                      # the stage's config as resolved
      "inputs": {"name": "sha256 or fingerprint", ...},
      "files": {"rel/path": {"bytes": 123, "sha256": "..."}, ...},
      "metrics": {...},
      ...                                   # stage-specific extras (e.g. "variants" for exports)
    }

A stage whose manifest records the same config and inputs is complete and can be skipped; that is what makes
``nestling run`` resumable. Stdlib only: the edge runtime reads these files too.

    write_manifest(out_dir, stage="export", config=cfg, inputs={"student": h}, files=["model.gguf"])
    m = read_manifest(out_dir); verify_files(out_dir, m, ["model.gguf"])
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError

FORMAT = "nestling/1"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_REQUIRED: Any = object()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-able object (configs, input lists)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory + os.replace: readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 lets the process umask decide the mode, as for any ordinary output (mkstemp's files
    # are private, and reading the umask means changing it process-wide).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, default: Any = _REQUIRED, fix: str = "re-run the stage that wrote it") -> Any:
    """A JSON file's content: a missing file gives `default` (or a NestlingError when none is given); a file
    that is not valid JSON is always a NestlingError naming it and `fix`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if default is _REQUIRED:
            raise NestlingError(f"{path}: not found; {fix}") from None
        return default
    except UnicodeDecodeError as e:
        raise NestlingError(f"{path}: not UTF-8 text ({e}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NestlingError(f"{path}: not valid JSON ({e}); {fix}") from None


def try_read_json(path: str | Path) -> Any:
    """A cache's content, or None when it is missing or unreadable (the caller recomputes it)."""
    try:
        return read_json(path, default=None)
    except (NestlingError, OSError):
        return None


def read_cache(path: str | Path, identity: Any, field: str = "result") -> Any:
    """The value a stage cached at `path` for `identity` (what it was computed from: specs, questions,
    recipe, files), or None when the file is missing, unreadable or was computed from something else.

        labels = read_cache(run.teacher_vote, identity, "labels")
        if labels is None:
            labels = vote(...)
            write_cache(run.teacher_vote, identity, labels, "labels", stage="eval-vote")

    The identity is fingerprinted as a manifest's config and inputs are, so a cache is fresh exactly when a
    manifest with the same content would be."""
    data = try_read_json(path)
    if not isinstance(data, dict) or data.get("key") != fingerprint(identity):
        return None
    return data.get(field)


def write_cache(path: str | Path, identity: Any, value: Any, field: str = "result", **extra: Any) -> None:
    """Store `value` for `identity` at `path` atomically, with `extra` fields (stage, config...) for readers
    of the file; read_cache finds it."""
    atomic_write_json(path, {**extra, "key": fingerprint(identity), field: value})


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """All rows at once, atomically (a reader sees the old file or the new one, never a torn one)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path, fix: str = "re-run the stage that wrote it") -> list[Any]:
    """Rows of a JSONL file; a missing file or a bad line is a NestlingError naming the line and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise NestlingError(f"{path}: not found; {fix}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise NestlingError(f"{path}:{i}: not valid JSON ({e}); {fix}") from None
    return rows


def describe_files(root: str | Path, rel_paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{rel_path: {bytes, sha256}} for files under root; a directory expands to every file in it."""
    root = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for rel in rel_paths:
        p = root / rel
        paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in paths:
            if not q.exists():
                raise NestlingError(f"manifest: {q} does not exist; cannot record it")
            out[q.relative_to(root).as_posix()] = {"bytes": q.stat().st_size, "sha256": sha256_file(q)}
    return out


def write_manifest(
    out_dir: str | Path,
    *,
    stage: str,
    config: Any = None,
    inputs: dict[str, Any] | None = None,
    files: Iterable[str] = (),
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Describe ``files`` (paths relative to out_dir) and write out_dir/manifest.json atomically."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config or {},
        "inputs": inputs or {},
        "files": describe_files(out_dir, files),
        "metrics": metrics or {},
        **extra,
    }
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | Path, stage: str | None = None) -> dict[str, Any]:
    """Read and sanity-check out_dir/manifest.json; raises NestlingError with the fix on any problem."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise NestlingError(f"{path}: no manifest; is {out_dir} a nestling output directory?")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NestlingError(f"{path}: not a {FORMAT} manifest; re-run the stage that wrote it")
    if stage is not None and manifest.get("stage") != stage:
        raise NestlingError(f"{path}: written by stage {manifest.get('stage')!r}, expected {stage!r}")
    return manifest


def try_read_manifest(out_dir: str | Path, stage: str | None = None) -> dict[str, Any] | None:
    try:
        return read_manifest(out_dir, stage)
    except NestlingError:
        return None


def verify_files(
    out_dir: str | Path, manifest: dict[str, Any], rel_paths: Iterable[str] | None = None
) -> None:
    """Check size and sha256 of the named files (default: all); a file under a named directory counts."""
    root = Path(out_dir)
    recorded: dict[str, dict[str, Any]] = manifest.get("files", {})
    wanted = list(recorded) if rel_paths is None else list(rel_paths)
    for rel in wanted:
        names = [n for n in recorded if n == rel or n.startswith(rel.rstrip("/") + "/")]
        if not names:
            raise NestlingError(f"{root / rel}: not listed in {root / MANIFEST}; the artifact is incomplete")
        for name in names:
            p = root / name
            meta = recorded[name]
            if not p.is_file():
                raise NestlingError(f"{p}: missing; the artifact is incomplete, re-export it")
            if p.stat().st_size != meta["bytes"]:
                raise NestlingError(
                    f"{p}: {p.stat().st_size} bytes, manifest says {meta['bytes']}; the file is truncated "
                    "or was replaced, re-export it"
                )
            if sha256_file(p) != meta["sha256"]:
                raise NestlingError(
                    f"{p}: sha256 does not match the manifest; the file was modified, re-export it"
                )


def is_fresh(out_dir: str | Path, stage: str, config: Any, inputs: dict[str, Any]) -> bool:
    """True when out_dir holds an intact, complete run of `stage` with this config and these inputs."""
    m = try_read_manifest(out_dir, stage)
    if m is None:
        return False
    same = fingerprint(m.get("config")) == fingerprint(json.loads(json.dumps(config, default=str)))
    same = same and fingerprint(m.get("inputs")) == fingerprint(json.loads(json.dumps(inputs, default=str)))
    if not same:
        return False
    try:
        verify_files(out_dir, m)
    except NestlingError:
        return False
    return True

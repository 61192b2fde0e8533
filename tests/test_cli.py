"""The command map: every command's flags come from its config's fields, `--help` says each default once, and
the runtime's commands never load torch."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from nestling.cli import COMMANDS, _load, main, parse_args


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_on_the_command_line(command, capsys):
    text = _help(command, capsys)
    cls = _load(COMMANDS[command].config)
    names = (
        list(cls.model_fields)
        if hasattr(cls, "model_fields")
        else [f.name for f in dataclasses.fields(cls) if f.init]
    )
    for name in names:
        positional = name in ("model_dir", "dir", "question", "student")
        assert (name.upper() if positional else "--" + name.replace("_", "-")) in text.replace(
            "STUDENT_DIR", "STUDENT"
        )
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    assert not re.search(r"\(default[^)]*\) \(default", flat)  # never "(default: x) (default: y)"


@pytest.mark.parametrize("command", [c for c, cmd in COMMANDS.items() if cmd.run_dir])
def test_the_run_directory_is_named_by_one_flag_in_every_command(command):
    # --run in every command that reads or writes a run directory; a config's own spelling (--out) still
    # parses to the same field, so older command lines keep working.
    field = COMMANDS[command].run_dir
    assert getattr(parse_args([command, "--run", "runs/x"]), field) == "runs/x"
    assert getattr(parse_args([command, f"--{field}", "runs/y"]), field) == "runs/y"


def test_required_export_flags_are_marked_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["export", "some/student"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_the_runtime_commands_never_import_torch():
    code = (
        "import sys, json; from nestling.cli import parse_args, _config, COMMANDS; "
        "args = parse_args(['ask', 'dir', 'q']); _config(COMMANDS['ask'], args); "
        "args = parse_args(['serve', 'dir', '--port', '9']); "
        "_config(COMMANDS['serve'], args); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _run_without(blocked: tuple[str, ...], code: str, cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` fails, as in an environment
    that lacks the extra that brings them."""
    guard = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}: raise ModuleNotFoundError(name=name.split('.')[0])\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", guard + code], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_train_help_needs_no_torch():
    proc = _run_without(
        ("torch", "transformers", "peft"), "from nestling.cli import main\nmain(['train', '--help'])"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--student" in proc.stdout


def test_help_lists_every_command_without_importing_any_stage():
    proc = _run_without(
        ("torch", "transformers", "pydantic", "fastapi", "onnxruntime", "llama_cpp"),
        "from nestling.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "import json; print(json.dumps(sorted(m for m in sys.modules if m.startswith(('nestling.distill', "
        "'nestling.export', 'nestling.run', 'nestling.serve.settings')))))",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout for name in COMMANDS)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["distill", "--out", "x"], ("torch",), "train"),
        (["traces", "--out", "x"], ("reasoning_gym",), "train"),
        (["export", "student", "--out", "x"], ("optimum",), "train,onnx,gguf"),
        (["serve", "some/dir"], ("pydantic", "pydantic_settings", "fastapi"), "serve"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(argv, blocked, extra, tmp_path):
    proc = _run_without(blocked, f"from nestling.cli import main\nsys.exit(main({argv!r}))", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"pip install 'nestling[{extra}]'" in lines[0]
    assert list(tmp_path.iterdir()) == []  # refused before any work: nothing written


@pytest.mark.parametrize(
    ("kind", "blocked", "extra"), [("gguf", "llama_cpp", "gguf"), ("onnx", "onnxruntime", "serve")]
)
def test_an_engine_without_its_library_names_the_extra(tmp_path, kind, blocked, extra):
    path = tmp_path / ("model.gguf" if kind == "gguf" else "model.onnx")
    path.write_bytes(b"GGUF" + bytes(64))
    (tmp_path / "tokenizer.json").write_text("{}")
    proc = _run_without(
        (blocked,),
        "from nestling.serve.engines import load_engine\nfrom nestling.core.errors import NestlingError\n"
        f"try:\n    load_engine({str(path)!r}, kind={kind!r})\n"
        "except NestlingError as e:\n    print(e)",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"pip install 'nestling[{extra}]'" in proc.stdout

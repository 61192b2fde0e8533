"""The command map: every command's flags come from its config's fields, `--help` says each default once, and
the runtime's commands never load torch."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from nestling.cli import COMMANDS, _load, build_parser, main


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


def test_required_export_flags_are_marked_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["export", "some/student"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_the_runtime_commands_never_import_torch():
    code = (
        "import sys, json; from nestling.cli import build_parser, _config, COMMANDS; "
        "args = build_parser().parse_args(['ask', 'dir', 'q']); _config(COMMANDS['ask'], args); "
        "args = build_parser().parse_args(['serve', 'dir', '--port', '9']); "
        "_config(COMMANDS['serve'], args); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []

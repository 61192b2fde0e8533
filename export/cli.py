"""`nestling export STUDENT_DIR --out DIR`: export's subcommand. Heavy imports stay inside the handler."""

from __future__ import annotations

import argparse

from nestling.export.pipeline import ExportConfig, export_student  # light: torch loads inside export_student


def register(sub: argparse._SubParsersAction) -> None:
    """Add `nestling export` to the CLI."""
    from nestling.serve.config import add_config_args

    p = sub.add_parser(
        "export",
        help="ONNX (fp32, int8) + GGUF (f16, Q8_0, Q4_K_M) of a student, parity-checked against PyTorch",
        description="Export a student and check every artifact against PyTorch on held-out prompts. "
        "Writes OUT.tmp-* and renames it to OUT when complete; fails (exit 2, nothing left) when an "
        "unquantized artifact does not match.",
    )
    p.add_argument("student", metavar="STUDENT_DIR", help="student directory (save_pretrained form)")
    add_config_args(p, ExportConfig, skip=("student",))
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from nestling.serve.config import config_from_args

    cfg = config_from_args(ExportConfig, args)
    m = export_student(cfg)
    print(f"exported {cfg.student} -> {cfg.out} ({m['metrics'].get('seconds', 0)} s)")
    torch_row = m["metrics"]["pytorch"]
    print(f"{'variant':<14}{'bytes':>12}{'accuracy':>10}{'delta':>8}{'greedy':>8}{'tf-top1':>9}{'tok/s':>9}")
    acc = torch_row.get("accuracy")
    print(
        f"{'pytorch':<14}{torch_row['bytes']:>12,}{_pct(acc):>10}{'':>8}{'':>8}{'':>9}{torch_row['tokens_per_s']:>9,.0f}"
    )
    for name, v in m["variants"].items():
        p = v["parity"]
        d = v.get("accuracy_delta")
        star = "*" if name == m["default_variant"] else ""
        print(
            f"{name + star:<14}{v['bytes']:>12,}{_pct(v.get('accuracy')):>10}"
            f"{'' if d is None else f'{100 * d:+.1f}':>8}{_pct(p['greedy_match']):>8}"
            f"{_pct(p['teacher_forced_top1']):>9}{v['tokens_per_s']:>9,.0f}"
        )
    print(f"* default variant; serve it with: nestling serve {cfg.out}")
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"

"""`nestling export STUDENT_DIR --out DIR`: what the export command prints. The command map (flags from
ExportConfig) is the root's cli.py; torch loads inside export_student."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nestling.export.pipeline import ExportConfig


def export_main(cfg: ExportConfig) -> int:
    """Export, then print the parity and accuracy table of every variant."""
    from nestling.export.pipeline import export_student

    from nestling.core.fmt import pct

    m = export_student(cfg)
    print(f"exported {cfg.student} -> {cfg.out} ({m['metrics'].get('seconds', 0)} s)")
    torch_row = m["metrics"]["pytorch"]
    print(f"{'variant':<14}{'bytes':>12}{'accuracy':>10}{'delta':>8}{'greedy':>8}{'tf-top1':>9}{'tok/s':>9}")
    acc = torch_row.get("accuracy")
    print(
        f"{'pytorch':<14}{torch_row['bytes']:>12,}{pct(acc):>10}{'':>8}{'':>8}{'':>9}{torch_row['tokens_per_s']:>9,.0f}"
    )
    for name, v in m["variants"].items():
        p = v["parity"]
        d = v.get("accuracy_delta")
        star = "*" if name == m["default_variant"] else ""
        print(
            f"{name + star:<14}{v['bytes']:>12,}{pct(v.get('accuracy')):>10}"
            f"{'' if d is None else f'{100 * d:+.1f}':>8}{pct(p['greedy_match']):>8}"
            f"{pct(p['teacher_forced_top1']):>9}{v['tokens_per_s']:>9,.0f}"
        )
    print(f"* default variant; serve it with: nestling serve {cfg.out}")
    return 0

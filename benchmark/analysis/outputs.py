"""The whole report: Fig. 3, the parameter plot, the zoo figure, the few-shot and ablation figures (PNG + PDF) and the
tables (Markdown + CSV), optionally to W&B."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.analysis.ablations import with_extra_test_columns, write_ablations
from benchmark.analysis.aggregate import (
    final_runs,
    fraction_curves,
    fraction_tables,
    load_summary,
    results_table,
    selected_hparams,
    skipped_line,
    skipped_runs,
    table_fraction,
    zoo_points,
)
from benchmark.analysis.audits import audit_frames, audits_markdown
from benchmark.analysis.leaderboard import write_leaderboard
from benchmark.analysis.paper import paper_comparison, unmatched
from benchmark.analysis.plots import plot_fig3, plot_params, plot_zoo
from benchmark.analysis.tables import fractions_markdown, table_markdown
from benchmark.core.tracking import log_report


def report_title(final: pd.DataFrame) -> str:
    tasks = sorted(final["dataset"].unique())
    seeds = final["seed"].nunique()
    return (f"{final['backbone'].iloc[0]} on {', '.join(tasks)} ({seeds} seed{'s' * (seeds > 1)}): VPT-deep vs "
            "other protocols; marker area ∝ log tuned-parameter %")

def write_skipped(summary: pd.DataFrame, out: Path, results_dir: str | Path) -> dict[str, Path]:
    """skipped.csv (path, reason, detail; a header alone when nothing was left out) and its one line on stderr;
    ValueError when the results hold no run record at all."""
    skipped, path = skipped_runs(summary), out / "skipped.csv"
    skipped.to_csv(path, index=False)
    files = summary.attrs.get("files")
    if not skipped.empty:
        line = skipped_line(skipped, len(summary) if files is None else files,
                            f"runs in {Path(results_dir) / 'summary.csv'}" if files is None else "run files")
        print(f"{line}. All of them: {path}", file=sys.stderr)
    if summary.empty:
        raise ValueError(f"No run records in {results_dir}" + (f" (every run file skipped: {path})" if files else "")
                         + ": run `make grid` first, or point RESULTS= at a folder holding runs/ or summary.csv.")
    return {"skipped.csv": path}


def write_report(results_dir: str | Path = "results", out_dir: str | Path | None = None,
                 datasets: list[str] | None = None, methods: list[str] | None = None, backbone: str | None = None,
                 fraction: float | None = None, use_wandb: bool = False, *, recipe: str | None = None,
                 epochs: int | None = None, wise_ft: bool = False, leaderboard: bool = False,
                 perf: str | Path | None = None) -> dict[str, Path]:
    """Fig. 3, the parameter plot, the zoo figure (PNG + PDF) and the tables (Markdown + CSV) into `out_dir`, with
    the audits of what the runs kept (audits.md and its CSVs); the few-shot and ablation figures where the results
    hold such grids (then they alone, if nothing else). First skipped.csv, every run file or run left out and why,
    and one line on stderr when there is any. `wise_ft`: also wise_ft.png/.pdf/.csv, which rebuilds models.
    `leaderboard`: also leaderboard.md/.csv and its figures, the costs from `perf` (default <results_dir>/perf.csv)."""
    out = Path(out_dir or Path(results_dir) / "figures")
    out.mkdir(parents=True, exist_ok=True)
    summary = load_summary(results_dir)
    written = write_skipped(summary, out, results_dir)
    filters = {"recipe": recipe, "epochs": epochs}
    figures = write_ablations(summary, out, datasets, methods, backbone, **filters)  # few-shot, option grids
    written |= figures
    try:
        final = final_runs(summary, datasets, methods, backbone, **filters)
    except ValueError:
        if not figures:
            raise
        if use_wandb:  # only few-shot / option-grid results: their figures are the report
            log_report(list(written.values()), {}, str(results_dir))
        return written
    curves, zoo = fraction_curves(final), zoo_points(final, fraction)
    figures = (("fig3", plot_fig3(curves, report_title(final))), ("params", plot_params(curves)),
               ("zoo", plot_zoo(zoo)))
    for name, fig in figures:
        for suffix in ("png", "pdf"):
            written[f"{name}.{suffix}"] = out / f"{name}.{suffix}"
            fig.savefig(written[f"{name}.{suffix}"], dpi=150)
    table = with_extra_test_columns(results_table(final, fraction), final)
    hparams, paper, by_fraction = selected_hparams(final), paper_comparison(final), fraction_tables(final)
    frames = {"table": table, "fig3_table": by_fraction, "fig3_data": curves, "zoo_data": zoo,
              "selected_hparams": hparams}
    if not paper.empty:
        frames["paper_comparison"] = paper
    audits = audit_frames(final, results_dir)
    frames |= audits
    if wise_ft:
        frames["wise_ft"] = write_wise_ft(final, results_dir, out, table_fraction(final, fraction), written)
    for name, frame in frames.items():
        written[f"{name}.csv"] = out / f"{name}.csv"
        frame.to_csv(written[f"{name}.csv"], index=False)
    written["table.md"] = out / "table.md"
    written["table.md"].write_text(table_markdown(table, hparams, paper, unmatched(final)))
    written["fig3_table.md"] = out / "fig3_table.md"
    written["fig3_table.md"].write_text(fractions_markdown(by_fraction))
    written["audits.md"] = out / "audits.md"
    written["audits.md"].write_text(audits_markdown(audits, final))
    if leaderboard:  # benchmark/analysis/leaderboard.py; docs/leaderboard.md
        files, tables = write_leaderboard(final, summary, out, results_dir, perf or Path(results_dir) / "perf.csv")
        written, frames = written | files, frames | tables
    if use_wandb:
        log_report([p for p in written.values() if p.suffix == ".png"], frames, str(results_dir))
    return written


def write_wise_ft(final: pd.DataFrame, results_dir: str | Path, out: Path, fraction: float,
                  written: dict[str, Path]) -> pd.DataFrame:
    """wise_ft.png/.pdf from the runs at `fraction` of Full and the merging methods that kept a checkpoint (each
    rebuilt and scored at every alpha); returns the per-run scores (wise_ft.csv)."""
    from benchmark.analysis.interpolation import plot_wise_ft, wise_ft, wise_ft_curves

    runs = wise_ft(final[np.isclose(final["train_fraction"], fraction)], results_dir)
    if runs.empty:
        raise ValueError(f"--wise-ft needs a checkpoint of Full or a merging method (LoRA, SSF, RepAdapter) at "
                         f"fraction {fraction:g}: run them with CHECKPOINT=1 (the default), or choose --fraction.")
    fig = plot_wise_ft(wise_ft_curves(runs))
    for suffix in ("png", "pdf"):
        written[f"wise_ft.{suffix}"] = out / f"wise_ft.{suffix}"
        fig.savefig(written[f"wise_ft.{suffix}"], dpi=150)
    return runs

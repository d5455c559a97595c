"""The whole report: Fig. 3, the parameter plot, the zoo figure, the few-shot and ablation figures (PNG + PDF) and the
tables (Markdown + CSV), optionally to W&B."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.analysis.ablations import with_extra_test_columns, write_ablations
from benchmark.analysis.aggregate import (
    final_runs,
    fraction_curves,
    fraction_tables,
    load_summary,
    results_table,
    selected_hparams,
    zoo_points,
)
from benchmark.analysis.paper import paper_comparison, unmatched
from benchmark.analysis.plots import plot_fig3, plot_params, plot_zoo
from benchmark.analysis.tables import fractions_markdown, table_markdown
from benchmark.core.tracking import log_report


def report_title(final: pd.DataFrame) -> str:
    tasks = sorted(final["dataset"].unique())
    seeds = final["seed"].nunique()
    return (f"{final['backbone'].iloc[0]} on {', '.join(tasks)} ({seeds} seed{'s' * (seeds > 1)}): VPT-deep vs "
            "other protocols; marker area ∝ log tuned-parameter %")

def write_report(results_dir: str | Path = "results", out_dir: str | Path | None = None,
                 datasets: list[str] | None = None, methods: list[str] | None = None, backbone: str | None = None,
                 fraction: float | None = None, use_wandb: bool = False) -> dict[str, Path]:
    """Fig. 3, the parameter plot, the zoo figure (PNG + PDF) and the tables (Markdown + CSV) into `out_dir`; the
    few-shot and ablation figures where the results hold such grids (then they alone, if nothing else)."""
    out = Path(out_dir or Path(results_dir) / "figures")
    out.mkdir(parents=True, exist_ok=True)
    summary = load_summary(results_dir)
    written = write_ablations(summary, out, datasets, methods, backbone)  # few-shot and option-grid figures
    try:
        final = final_runs(summary, datasets, methods, backbone)
    except ValueError:
        if not written:
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
    for name, frame in frames.items():
        written[f"{name}.csv"] = out / f"{name}.csv"
        frame.to_csv(written[f"{name}.csv"], index=False)
    written["table.md"] = out / "table.md"
    written["table.md"].write_text(table_markdown(table, hparams, paper, unmatched(final)))
    written["fig3_table.md"] = out / "fig3_table.md"
    written["fig3_table.md"].write_text(fractions_markdown(by_fraction))
    if use_wandb:
        log_report([p for p in written.values() if p.suffix == ".png"], frames, str(results_dir))
    return written

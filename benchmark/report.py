"""The report: Fig. 3, the parameter plot, the zoo figure and a Table-1 style table, drawn from the results alone.

    python -m benchmark.report [--results-dir results] [--out results/figures] [--datasets a,b] [--backbone X]
                               [--recipe quick] [--epochs 20] [--fraction 1.0] [--wandb] [--wise-ft]
                               [--leaderboard [--perf results/perf.csv]]
    python -m benchmark.report --results-dir <full search> --compare-search <halving search>

It reads run JSONs (refreshing results/summary.csv) — never builds a model unless --wise-ft asks — and writes PNG +
PDF figures and Markdown + CSV tables. audits.md holds what the runs' saved curves and test logits give (the
selection audit, McNemar against Full, per-class accuracy, calibration, the seed ensemble;
benchmark/analysis/audits.py); --wise-ft adds wise_ft.png, the WiSE-FT interpolation of Full and the merging
methods (benchmark/analysis/interpolation.py); --leaderboard adds leaderboard.md, every method ranked per dataset,
suite and overall with its interval, budget and costs, and its Pareto figures (benchmark/analysis/leaderboard.py,
docs/leaderboard.md). The figures follow Jia et al., "Visual Prompt Tuning", ECCV 2022
(https://arxiv.org/abs/2203.12119): Fig. 3 compares VPT-deep with Linear, Adapter and Bias over training-data
fractions, and Table 1 lists mean top-1 per task, tuned parameters and the number of tasks beating Full (and a
column per extra test set); fig3_table.md gives Fig. 3's numbers, each point's interval and its verdict against
Full. Few-shot grids add shots.png, option grids ablation_<option>.png (benchmark/analysis/ablations.py).
Every run file left out (unreadable, corrupt, not a run record, a failed run) is counted in one line on stderr and
listed in skipped.csv; a point's seeds made with different recipes or epochs are never averaged: the report refuses
and names them, and --recipe / --epochs keep one (docs/reliability.md, "What the report reads").
notebooks/results.ipynb calls the same functions on results/summary.csv.
"""

from __future__ import annotations

import argparse
import sys

from benchmark.analysis.outputs import write_report
from benchmark.analysis.search_agreement import write_search_agreement
from benchmark.core.cli import add_switch, comma_list
from benchmark.core.config import EMBEDDED_BACKBONE
from benchmark.core.store import check_results_dir, is_storage_error, storage_problem
from datamodules import EMBEDDED_DATASETS
from methods.registry import fig3_methods


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", "--results", default="results")
    p.add_argument("--out", help="default: <results-dir>/figures")
    p.add_argument("--datasets", type=comma_list(str), help="comma list (default: every dataset with results)")
    p.add_argument("--methods", type=comma_list(str), help="comma list (default: every method with results)")
    p.add_argument("--backbone", help="needed when the results hold several backbones")
    p.add_argument("--recipe", help="only runs of this recipe: needed when a point's seeds mix recipes")
    p.add_argument("--epochs", type=int, help="only runs of this many epochs: needed when a point's seeds mix them")
    p.add_argument("--fraction", type=float, help="train fraction of the table (default: the largest present)")
    add_switch(p, "--wandb", help="log figures and tables to a W&B report run")
    add_switch(p, "--wise-ft",
               help="also WiSE-FT (wise_ft.png): rebuilds Full and the merging methods from their checkpoints and "
                    "scores them at weights interpolated with the pretrained ones; the one option that builds models")
    add_switch(p, "--leaderboard", help="also the leaderboard (leaderboard.md/.csv, leaderboard_*.png)")
    p.add_argument("--perf", help="the leaderboard's costs: a `make perf` CSV (default: <results-dir>/perf.csv)")
    p.add_argument("--compare-search", metavar="HALVING_RESULTS",
                   help="only search_agreement.md/.csv: the halving search in HALVING_RESULTS against the full search "
                        "in --results-dir, cell by cell (benchmark/analysis/search_agreement.py)")
    p.add_argument("--fig3", action="store_true",
                   help="the embedded Fig. 3: the embedded tasks, the paper's six methods, the embedded backbone")
    p.add_argument("--zoo", action="store_true",
                   help="the embedded zoo: the embedded tasks, every method with results, the embedded backbone")
    return p

def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.fig3:
        args.datasets, args.methods = list(EMBEDDED_DATASETS), fig3_methods()
        args.backbone = args.backbone or EMBEDDED_BACKBONE
    if args.zoo:
        args.datasets, args.backbone = list(EMBEDDED_DATASETS), args.backbone or EMBEDDED_BACKBONE
    try:
        results_dir = check_results_dir(args.results_dir)
        if args.compare_search:
            written = write_search_agreement(results_dir, check_results_dir(args.compare_search), args.out)
        else:
            written = write_report(results_dir, args.out, args.datasets, args.methods, args.backbone, args.fraction,
                                   args.wandb, recipe=args.recipe, epochs=args.epochs, wise_ft=args.wise_ft,
                                   leaderboard=args.leaderboard, perf=args.perf)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk under the figures: one line, the results are untouched
        if not is_storage_error(err):
            raise
        print(f"error: {storage_problem(err, args.out or args.results_dir)}", file=sys.stderr)
        return 1
    for shown in ("table.md", "search_agreement.md"):  # the report's table, or the comparison's
        if shown in written:
            print(written[shown].read_text())
    print("Wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

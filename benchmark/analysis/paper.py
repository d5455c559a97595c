"""The paper beside us: VPT's Table 1 numbers per task (vpt_paper_table1.csv, sources in its header) next to the
measured top-1 of the same method and task, with Δ = measured − paper, and the group means as the paper takes them:
FGVC the mean of its 5 tasks, VTAB-1k the mean of each group (Natural, Specialized, Structured). The mean of the three
group means, the VTAB-1k average of later papers (NOAH, Convpass), follows them; Table 1 prints the groups only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.analysis.aggregate import dataset_groups
from benchmark.core.config import PAPER_BACKBONE
from methods.registry import label, table_order

PAPER_CSV = Path(__file__).with_name("vpt_paper_table1.csv")
PAPER_FRACTION = 1.0  # Table 1 trains on all the training data
VTAB_AVERAGE = "VTAB-1k (mean of groups)"
COLUMNS = ["method", "label", "row", "group", "task", "dataset", "paper", "measured", "delta", "seeds"]


def paper_numbers() -> pd.DataFrame:
    """One row per (task, method): benchmark, task (the paper's name), dataset (the suite's), method, protocol,
    top1, source, and group: FGVC, or the VTAB-1k group the suite's datamodule declares."""
    paper = pd.read_csv(PAPER_CSV, comment="#")
    groups = dataset_groups(paper["dataset"].unique())
    paper["group"] = [groups.get(d, b) for d, b in zip(paper["dataset"], paper["benchmark"], strict=True)]
    return paper


def paper_runs(final: pd.DataFrame) -> pd.DataFrame:
    """The runs comparable with Table 1: the paper's backbone at 100% of the data (none for any other backbone)."""
    at = final[np.isclose(final["train_fraction"], PAPER_FRACTION)]
    return at if set(at["backbone"]) == {PAPER_BACKBONE} else at.iloc[:0]

def paper_comparison(final: pd.DataFrame) -> pd.DataFrame:
    """Paper | measured | Δ per (method, task) where both exist, then per group whose every task was measured, for
    runs of the paper's backbone at 100% of the data; empty for any other backbone (no paper column there)."""
    at = paper_runs(final)
    if at.empty:
        return pd.DataFrame(columns=COLUMNS)
    measured = at.groupby(["method", "dataset"])["test_top1"].agg(measured="mean", seeds="count").reset_index()
    paper = paper_numbers().rename(columns={"top1": "paper"})
    tasks = paper.merge(measured, on=["method", "dataset"], how="inner")
    tasks["row"] = "task"
    rows = [tasks]
    for method, per_method in tasks.groupby("method", sort=False):
        means = group_means(per_method, paper[paper["method"] == method])
        rows.append(means.assign(method=method))
    frame = pd.concat(rows, ignore_index=True)
    frame["delta"] = frame["measured"] - frame["paper"]
    frame["label"] = frame["method"].map(label)
    rank = {m: i for i, m in enumerate(table_order(frame["method"].unique()))}
    frame = frame.assign(rank=frame["method"].map(rank)).sort_values(["rank"], kind="stable")
    return frame[COLUMNS].reset_index(drop=True)


def group_means(measured: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Rows for each group (FGVC, Natural, ...) of `paper` whose every task is in `measured`, and the VTAB-1k
    average of the three group means when all three are complete."""
    rows = []
    for group, members in paper.groupby("group", sort=False):
        got = measured[measured["group"] == group]
        if set(got["dataset"]) == set(members["dataset"]):
            rows.append({"row": "group", "task": f"{group} mean", "group": group, "paper": members["paper"].mean(),
                         "measured": got["measured"].mean(), "seeds": got["seeds"].min()})
    vtab = [r for r in rows if r["group"] != "FGVC"]
    if len(vtab) == paper.loc[paper["benchmark"] == "VTAB-1k", "group"].nunique() == 3:
        rows.append({"row": "average", "task": VTAB_AVERAGE, "group": "VTAB-1k",
                     "paper": np.mean([r["paper"] for r in vtab]), "measured": np.mean([r["measured"] for r in vtab]),
                     "seeds": min(r["seeds"] for r in vtab)})
    return pd.DataFrame(rows)


def unmatched(final: pd.DataFrame) -> list[str]:
    """`method on dataset` of the paper's tasks measured on the paper's backbone with no sourced paper number."""
    at = paper_runs(final)
    if at.empty:
        return []
    paper = paper_numbers()
    known = set(zip(paper["method"], paper["dataset"], strict=True))
    cells = at[at["dataset"].isin(set(paper["dataset"]))][["method", "dataset"]].drop_duplicates()
    return [f"{label(m)} on {d}" for m, d in zip(cells["method"], cells["dataset"], strict=True) if (m, d) not in known]

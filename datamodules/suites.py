"""Dataset suites: the names a grid expands (`DATASETS=vtab-1k`, `DATASETS=fgvc`) and their groups, the one table
the report averages over (the paper's VTAB-1k Natural / Specialized / Structured means, and the FGVC mean).

The groups are read from the families' own tables (`VTAB_TASKS[task].group`, `FGVC_DATAMODULES`): a task added there
joins its suite and group here with no edit.
"""

from __future__ import annotations

from datamodules.fgvc import FGVC_DATAMODULES
from datamodules.vtab import VTAB_TASKS

VTAB_GROUPS = ("natural", "specialized", "structured")  # the paper's order (Jia et al., Table 1)

# suite -> group -> its datasets, in the families' order; a suite of one group names it after the suite
SUITES: dict[str, dict[str, tuple[str, ...]]] = {
    "vtab-1k": {group: tuple(f"vtab/{task}" for task, info in VTAB_TASKS.items() if info.group == group)
                for group in VTAB_GROUPS},
    "fgvc": {"fgvc": tuple(cls.name for cls in FGVC_DATAMODULES)},
}


def suite_datasets(suite: str) -> tuple[str, ...]:
    """Every dataset of `suite`, group by group."""
    return tuple(name for names in SUITES[suite].values() for name in names)


def dataset_group(dataset: str) -> tuple[str, str] | None:
    """(suite, group) of a dataset that belongs to a suite, else None (the embedded tasks, folders)."""
    return next(((suite, group) for suite, groups in SUITES.items() for group, names in groups.items()
                 if dataset in names), None)


"""Write the suite's data-fraction splits of an FGVC dataset as `train_<p>.json` files, so that other code (VPT's
own, for one: its json_dataset.py reads `train_<p>.json`) trains on exactly the examples this suite does.

    python -m benchmark.splits --dataset cub --data-root <DATA_ROOT> [--fractions 0.1 0.2 0.4 0.8] [--seed 0]
    make splits DATASET=cub DATA_ROOT=<dir> [FRACTIONS="0.1 0.2 0.4 0.8"]

Each file is the subset of train.json that `datamodules/base.py::fraction_indices` keeps (per class, seeded, nested:
train_0.1 lies inside train_0.2, ...), in train.json's format {relative image path: class id}. Once a file exists,
runs at that fraction read it instead of splitting, whatever their seed. A file that exists with other contents
(e.g. a published split) is kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmark.core.cli import add_switch, split_list
from benchmark.core.store import atomic_write_text
from benchmark.sweeps.spec import FIG3_FRACTIONS
from datamodules import FGVC_DATASETS, fraction_indices, get_datamodule_class
from datamodules.checks import DataError
from datamodules.fgvc import SPLIT_FILES, fraction_file_name

FRACTION_FILE_FRACTIONS = tuple(f for f in FIG3_FRACTIONS if f < 1)  # 100% is the whole train file: no file of its own


def parse_fractions(values: list[str]) -> list[float]:
    """'0.1 0.2', '0.1,0.2' or several arguments -> [0.1, 0.2]; each in (0, 1)."""
    fractions = []
    for text in split_list(" ".join(values)):
        try:
            fraction = float(text)
        except ValueError:
            raise DataError(f"FRACTIONS must be numbers in (0, 1), got {text!r}; e.g. FRACTIONS=\"0.1 0.2\".") from None
        if not 0.0 < fraction < 1.0:
            raise DataError(f"FRACTIONS must be in (0, 1) (a fraction of 1 is train.json itself), got {text}.")
        fractions.append(fraction)
    return sorted(set(fractions))


def fraction_subsets(dataset: str, data_root: str | Path, fractions: list[float], seed: int = 0) -> dict[float, dict]:
    """{fraction: {relative image path: raw class id}} by the suite's split of train.json."""
    if dataset not in FGVC_DATASETS:
        raise DataError(f"`make splits` writes the FGVC JSON fraction files; DATASET must be one of "
                        f"{', '.join(FGVC_DATASETS)}, got {dataset!r}.")
    datamodule = get_datamodule_class(dataset)(data_config={}, data_root=str(data_root))
    _, labels, ids = datamodule.list_split("train")
    train = datamodule.annotation(SPLIT_FILES["train"])
    return {f: {ids[i]: train[ids[i]] for i in fraction_indices(labels, f, seed)} for f in fractions}


def write_fraction_files(dataset: str, data_root: str | Path, fractions: list[float] = FRACTION_FILE_FRACTIONS,
                         seed: int = 0, force: bool = False) -> list[Path]:
    """Write `train_<p>.json` for each fraction; returns the paths written (unchanged files included)."""
    root = Path(data_root)
    subsets = fraction_subsets(dataset, root, fractions, seed)
    files = {root / fraction_file_name(f): subset for f, subset in subsets.items()}
    texts = {path: json.dumps(subset, indent=0) + "\n" for path, subset in files.items()}
    clashes = [path.name for path, text in texts.items() if path.is_file() and path.read_text() != text]
    if clashes and not force:
        raise DataError(f"{root} already has {', '.join(clashes)} with other contents (a published split?). Runs "
                        "read those files; pass --force (FORCE=1) to replace them with the suite's split.")
    for path, text in texts.items():
        atomic_write_text(path, text)
        print(f"{path}: {len(files[path])} images")
    return list(files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=", ".join(FGVC_DATASETS))
    p.add_argument("--data-root", required=True)
    p.add_argument("--fractions", nargs="*", default=[], help="default: 0.1 0.2 0.4 0.8 (the paper's Fig. 3)")
    p.add_argument("--seed", type=int, default=0)
    add_switch(p, "--force", help="replace fraction files that differ")
    args = p.parse_args(argv)
    try:
        fractions = parse_fractions(args.fractions) or list(FRACTION_FILE_FRACTIONS)
        write_fraction_files(args.dataset, args.data_root, fractions, args.seed, args.force)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A W&B sweep config for a grid, so `wandb agent` can spread its runs over machines.

    python -m benchmark.sweep --methods vpt_deep,linear --fractions 0.1,1.0 --seeds 0,1 --datasets digits \\
        [--out results/sweep.yaml] [any benchmark.run option: --epochs 5 ...]
    wandb sweep results/sweep.yaml        # prints the sweep id
    wandb agent <entity>/<project>/<id>   # on every machine, in the repository with the venv active

Each sweep run is one `python -m benchmark.run --wandb` with method, dataset, fraction (or shots), OPTIONS' point and
seed from the grid (W&B's `grid` search method enumerates every combination once). Results land in each machine's
results/;
W&B groups them by dataset and tags them by method, as for `make grid WANDB=1`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from benchmark.core.errors import ConfigError
from benchmark.core.store import atomic_write_text
from benchmark.core.tracking import project
from benchmark.grid import grid_spec
from benchmark.grid import parser as grid_parser
from benchmark.sweeps.spec import GridSpec

HEADER = """\
# W&B sweep of a vpt-bench grid ({n} runs), written by `{command}`.
# Start it with `wandb sweep {out}`, then run `wandb agent <entity>/<project>/<sweep id>` on each machine
# (in the repository, with its venv active so `python` has the suite installed).
"""


def option_point_text(point: dict) -> str:
    """An option point as benchmark.run's --options reads it back (values as YAML scalars)."""
    return ";".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in point.items())


def sweep_config(spec: GridSpec, run_args: list[str], project_name: str) -> dict:
    """The sweep as a dict: a grid over method x dataset x fraction (or shots) x options x seed; every other run
    option fixed."""
    data = ({"shots": {"values": [int(k) for k in spec.shots]}} if spec.shots is not None
            else {"fraction": {"values": [float(f) for f in spec.fractions]}})
    options = {"options": {"values": [option_point_text(p) for p in spec.options]}} if spec.options else {}
    n = len(spec.configs())
    axes = f"{len(next(iter(data.values()))['values'])} {'shot counts' if spec.shots is not None else 'fractions'}"
    axes += f" x {len(spec.options)} option points" if spec.options else ""
    return {
        "name": f"vpt-bench grid: {len(spec.methods)} methods x {len(spec.datasets)} datasets x "
                f"{axes} x {len(spec.seeds)} seeds = {n} runs",
        "project": project_name,
        "program": "benchmark/run.py",
        "method": "grid",
        "metric": {"name": "test_top1", "goal": "maximize"},
        "parameters": {"method": {"values": list(spec.methods)}, "dataset": {"values": list(spec.datasets)},
                       **data, **options, "seed": {"values": [int(s) for s in spec.seeds]}},
        # ${args} expands to --method=... --dataset=... --fraction=... --seed=..., which benchmark.run parses.
        "command": ["${env}", "python", "-m", "benchmark.run", "--wandb", *run_args, "${args}"],
    }


def main(argv: list[str] | None = None) -> int:
    p = grid_parser()
    p.description = __doc__
    p.add_argument("--out", default="results/sweep.yaml", help="where to write the sweep YAML")
    p.add_argument("--project", default=project(), help="W&B project (default: $WANDB_PROJECT or vpt-bench)")
    args, run_args = p.parse_known_args(argv)
    try:
        if args.search:
            raise ConfigError("SEARCH=1 cannot be a W&B sweep: its final runs depend on the search's results. Spread "
                              "it instead with `make grid SEARCH=1 DATASETS=... METHODS=...` per machine writing to "
                              "one shared RESULTS folder (every run is a file, finished ones are skipped).")
        spec = grid_spec(args, run_args, argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = sweep_config(spec, run_args, args.project)
    n = len(spec.configs())
    command = "python -m benchmark.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    text = HEADER.format(n=n, command=command.strip(), out=args.out) + yaml.safe_dump(config, sort_keys=False)
    atomic_write_text(Path(args.out), text)
    print(f"Wrote {args.out} ({n} runs). Next: wandb sweep {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One benchmark run: config -> backbone + method + datamodule -> Lightning Trainer -> result JSON.

    python -m benchmark.run --method vpt_deep --fraction 0.1 [--dataset digits] [--seed 0] ...
    python -m benchmark.run --method lora --fraction 0.1 --seed 5 --train-on trainval --recipe selected:results

RECIPE=selected:<results> takes the lr and weight decay a search there chose for this run's dataset, backbone, data
and method (benchmark/sweeps/selected.py, as a grid does): a new seed or a final again, without the search.
"""

from __future__ import annotations

import argparse
import sys

from benchmark.core.cli import add_settings, settings_from_args
from benchmark.core.config import RunConfig
from benchmark.core.errors import ConfigError
from benchmark.core.pipeline import run
from benchmark.core.store import is_storage_error, storage_problem
from benchmark.sweeps.selected import with_selected_recipe


def parser() -> argparse.ArgumentParser:
    """Every RunConfig field as a flag (benchmark/core/config.py declares each once, with its help and checks)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, RunConfig)
    return p

def config_from_args(argv: list[str] | None = None) -> RunConfig:
    return RunConfig(**settings_from_args(parser().parse_args(argv)))

def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 ok (or already done, or claimed: another live process trains it), 1 the run failed (recorded),
    2 bad input (nothing ran)."""
    cfg = None
    try:
        cfg = with_selected_recipe(config_from_args(argv))  # a missing choice: ConfigError, before weights load
        result = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_storage_error(err):
            raise
        print(f"error: {storage_problem(err, cfg and cfg.results_dir)}", file=sys.stderr)
        return 1
    return 0 if result.get("status") in ("ok", "claimed") else 1


if __name__ == "__main__":
    sys.exit(main())

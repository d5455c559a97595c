"""Re-score or export a finished run from its checkpoint (issue 28; library: benchmark/core/rebuild.py, export.py).

    python -m benchmark.evaluate --run results/runs/<dataset>/<backbone>/<method>/<run>.json
        [--dataset D --data-root DIR] [--extra-test name=dir,...] [--export merged [--output F]]

On the run's own test set the rebuilt model gives the recorded test_top1 exactly ("reproduced": true). Prints one
JSON line. Exit status: 0 done, 2 bad input (one line naming the file and the fix; nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmark.core.cli import add_settings
from benchmark.core.errors import ConfigError
from benchmark.core.rebuild import EvaluateConfig, evaluate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(p, EvaluateConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        found = evaluate(EvaluateConfig(**vars(parser().parse_args(argv))))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(found, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

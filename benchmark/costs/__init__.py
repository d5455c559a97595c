"""What methods cost: time, memory and FLOPs per step (`make perf`), the data loader (`LOADER_BENCHMARK=1`) and the
GPU check (`make gpu-check`). Tools over the one-run library, not part of a run."""

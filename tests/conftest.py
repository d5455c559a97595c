"""Shared fixtures: a tiny ViT (pretrained=False), a ViT-B/16 to count, a small batch, a per-test image cache.

The builders behind them live in tests/helpers/ (a test imports those; it never imports conftest or another test
module: tests/test_layout.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.models import make_tiny_vit, make_vit_b


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return make_tiny_vit()


@pytest.fixture(scope="session")
def vit_b_once():
    """One random-init ViT-B/16 per session (~3 s to build); nothing uses it but `vit_b`, which copies it."""
    return make_vit_b()


@pytest.fixture
def vit_b(vit_b_once):
    """A random-init ViT-B/16 of this test's own (pretrained=False), free to wrap and change: a deep copy (~0.6 s)
    of the session's one."""
    return copy.deepcopy(vit_b_once)


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 1])


@pytest.fixture(autouse=True)
def own_checked_images_cache(tmp_path, monkeypatch):
    """Each test remembers decoded image lists in its own folder, never in ~/.cache (datamodules/checks.py)."""
    monkeypatch.setenv("VPT_BENCH_CACHE", str(tmp_path / "vpt-bench-cache"))


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers), each worker takes one core: the tiny models' steps are
    dispatch-bound, so two one-thread workers finish sooner than one two-thread process (benchmark/sweeps/runner.py
    measured the same for grids)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)

"""Shared test setup and the test tiers.

Tiers are folders, and each folder's tests get its marker here so ``-m`` selects by tier:

* ``tests/unit/``        fast, one process (Triton kernels run in a child under the interpreter);
* ``tests/distributed/`` real multi-process gloo groups (marker ``distributed``);
* ``tests/e2e/``         ``train.py``, torchrun, launchers and benchmark scripts as subprocesses
                         (markers ``e2e`` and ``distributed``: they start processes too);
* ``tests/gpu/``         CUDA only (marker ``gpu``; skipped without a GPU).

``pytest -m "not distributed"`` is the one-minute loop; plain ``pytest`` (the README's command, CI) runs all.
"""
import os
import sys

import pytest

# Tests import the shared float64 reference as `reference` and the process launcher as `dist_utils`.
sys.path.insert(0, os.path.dirname(__file__))
# transformers is only a local reference in tests: never reach for the hub (no network in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_TIER_MARKERS = {"distributed": ("distributed",), "e2e": ("e2e", "distributed"), "gpu": ("gpu",), "unit": ("unit",)}


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        rel = os.path.relpath(str(item.fspath), here)
        for name in _TIER_MARKERS.get(rel.split(os.sep)[0], ()):
            item.add_marker(getattr(pytest.mark, name))
        if "gpu" in item.keywords and not _cuda():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

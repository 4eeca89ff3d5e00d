"""Shared test plumbing: fixture directories, determinism, the `gpu` marker."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE_DIR = ROOT / "tests" / "fixtures" / "reference"


def fixture_dirs() -> list[Path]:
    """Directories named by SANA_WM_FIXTURE_DIRS (colon-separated), default tests/fixtures/reference."""
    raw = os.environ.get("SANA_WM_FIXTURE_DIRS", "")
    dirs = [Path(p) for p in raw.split(":") if p.strip()] or [DEFAULT_FIXTURE_DIR]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"SANA_WM_FIXTURE_DIRS names {str(d)!r}, which is not a directory")
    return dirs


def fixture_files(name: str) -> list[Path]:
    """Every file called `name` in the fixture directories (a parametrisation source)."""
    return [d / name for d in fixture_dirs() if (d / name).is_file()]


def fixture_params(name: str):
    files = fixture_files(name)
    return [pytest.param(f, id=f"{f.parent.name}/{f.name}") for f in files]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing means no GPU either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_fp32():
    """Parity tests run with TF32 off (fixtures/README.md)."""
    try:
        import torch
    except ImportError:
        yield
        return
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture
def poison_cpu(monkeypatch):
    """NaN-fill every floating-point torch.empty while the test runs (kernel outputs and workspaces), so an element
    a kernel fails to write, or a workspace row read before it is written, shows up."""
    import torch

    empty = torch.empty

    def poisoned(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def poison_cuda():
    """Fill the caching allocator's free blocks with NaN so torch.empty buffers start as NaN."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blob = torch.full((64 << 20,), float("nan"), device="cuda")  # 256 MB, split for the following allocations
    del blob
    yield

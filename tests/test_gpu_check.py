"""benchmarks/gpu_check.sh without a GPU: it must parse and fail clearly, not half-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run")
def test_gpu_check_fails_clearly_without_cuda():
    out = subprocess.run(
        ["bash", str(SCRIPT), sys.executable], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr and out.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_likelihood_refuses_missing_cuda():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_likelihood.py"), "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "CUDA is not available" in out.stderr

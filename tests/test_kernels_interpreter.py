"""Runs tests/test_kernels_triton.py on the CPU through Triton's interpreter, in a process of its own:
Triton decides between compiling and interpreting when it is imported, so the flag cannot be set here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.slow  # a second pytest process, and every kernel interpreted in Python
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernel tests run compiled, in this process")
def test_triton_kernels_under_the_interpreter():
    tests = Path(__file__).with_name("test_kernels_triton.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]

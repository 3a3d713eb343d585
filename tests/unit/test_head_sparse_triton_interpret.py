"""The per-head Triton kernel against the torch reference under Triton's interpreter on CPU.

The interpreter must be switched on before triton is first imported (vLLM imports it in other
test modules of this session), and the switch must not leak into the vLLM workers that
integration tests start from this process's environment: so the cases
(``head_sparse_triton_cases.py``) run in a child pytest with ``TRITON_INTERPRET=1``.
On a GPU machine run that file directly instead (compiled kernels).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("head_sparse_triton_cases.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cases run compiled")
def test_kernel_matches_reference_under_the_interpreter():
    pytest.importorskip("triton")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=os.environ | {"TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=600, cwd=CASES.parents[2])
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert "28 passed" in child.stdout, child.stdout[-2000:]

"""`tessera mobile ...`: sizes parse, the subcommands are registered, mobile/ stands alone."""

import subprocess
import sys
from pathlib import Path

import pytest

from mobile.cli import parse_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,expected", [("64MiB", 64 << 20), ("1GiB", 1 << 30),
                                           ("1.5KiB", 1536), ("1000", 1000), ("2MB", 2 * 10**6)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_unknown_units():
    with pytest.raises(Exception, match="cannot parse"):
        parse_bytes("64 parsecs")


def test_tessera_mobile_run_parses_the_issue_example():
    from server.cli import build_parser

    args = build_parser().parse_args(["mobile", "run", "--dram-budget", "64MiB",
                                      "--prompt", "hi"])
    assert args.dram_budget == 64 << 20 and args.prompt == "hi" and args.config is None


def test_mobile_imports_nothing_else_of_ours():
    code = ("import sys, mobile.cli, mobile.activeflow.engine, mobile.activeflow.sparsity, "
            "mobile.activeflow.text, mobile.activeflow.mmap_baseline, mobile.npu.gemm, "
            "mobile.npu.lut_softmax, mobile.tts.best_of_n, mobile.tts.beam, mobile.tts.cli\n"
            "ours = {'server', 'prompt_pipeline', 'attention_backends', 'kv_manager', "
            "'tessera_config'}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ours)\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

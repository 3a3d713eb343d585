"""The gateway image installs no torch, vLLM or transformers (it only proxies): the gateway
and the `tessera` command must import and build their parser without them."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ("torch", "vllm", "transformers")

_WITHOUT_HEAVY_PACKAGES = f"""
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name.split(".")[0])
        return None

sys.meta_path.insert(0, Blocked())
import server.app
import server.cli

commands = server.cli.build_parser()._subparsers._group_actions[0].choices
print(",".join(sorted(commands)))
"""


def test_gateway_and_cli_import_without_torch() -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_HEAVY_PACKAGES],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    commands = set(result.stdout.strip().split(","))
    assert {"serve", "gateway", "worker"} <= commands
    assert "patterns" not in commands and "leank" not in commands  # they need torch


def test_cli_has_the_model_tools_where_torch_is_installed() -> None:
    import server.cli

    commands = server.cli.build_parser()._subparsers._group_actions[0].choices
    assert {"patterns", "leank", "mobile", "securitylingua"} <= set(commands)

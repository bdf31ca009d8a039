"""Where things are in the checkout, and the one way a test loads a tools/ script."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]  # the repository root
PACKAGE = ROOT / "maskdit_ds"
TOOLS = ROOT / "tools"


def tool(name: str) -> ModuleType:
    """tools/<name>.py imported as module `name` (once per process), to call its functions or main(argv)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses and pickling look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


def tool_command(name: str, *args) -> list[str]:
    """The command line that runs tools/<name>.py as a script in a new process."""
    return [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)]

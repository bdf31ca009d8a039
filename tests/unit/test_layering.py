"""Import layering: only engine.py imports deepspeed; model code is pure torch."""
import ast
import subprocess
import sys
from pathlib import Path

from repo import PACKAGE, TOOLS


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_engine_imports_deepspeed():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "engine.py" and any(m.split(".")[0] == "deepspeed" for m in imported_modules(p))]
    assert offenders == []


def test_model_code_is_pure_torch():
    for path in (PACKAGE / "model").rglob("*.py"):
        text = path.read_text()
        modules = imported_modules(path)
        assert not any(m.startswith(("torch.distributed", "deepspeed")) for m in modules), path
        assert ".module." not in text and "get_rank" not in text, path


def collective_calls(path: Path) -> list[str]:
    """Every way to reach a collective without dist.py: importing torch.distributed or deepspeed.comm (under any
    alias, or a function from them), or spelling out torch.distributed.* / deepspeed.comm.*."""
    found = [f"imports {m}" for m in sorted(imported_modules(path))
             if m.startswith(("torch.distributed", "deepspeed.comm"))]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                (node.value.id, node.attr) in (("torch", "distributed"), ("deepspeed", "comm")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_every_collective_goes_through_dist_py():
    """NCCL refuses CPU tensors: dist.py moves them to the process group's device. A collective called anywhere
    else (the package or its tools) would bypass that, and crash the first GPU run."""
    files = [*PACKAGE.rglob("*.py"), *TOOLS.glob("*.py")]
    offenders = {str(p.relative_to(PACKAGE.parent)): calls for p in files if p.name != "dist.py"
                 for calls in [collective_calls(p)] if calls}
    assert offenders == {}


def test_the_scan_would_catch_a_stray_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport deepspeed\nfrom torch.distributed import all_reduce\n"
                   "def f(t):\n    torch.distributed.barrier()\n    deepspeed.comm.barrier()\n    torch.gather(t, 0, t)\n")
    assert collective_calls(bad) == ["imports torch.distributed", "line 5: torch.distributed",
                                     "line 6: deepspeed.comm"]


def test_config_and_the_registries_it_reads_import_without_torch():
    """Parsing a config (and the light registries it reads at import: optimizers) needs no torch, so a config
    error comes back before any heavy import. The package's __init__ (which imports the model) is skipped."""
    code = ("import importlib, sys, types\n"
            "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
            f"package = types.ModuleType('maskdit_ds'); package.__path__ = [{str(PACKAGE)!r}]\n"
            "sys.modules['maskdit_ds'] = package\n"
            "config = importlib.import_module('maskdit_ds.config')\n"
            "config.load_config('digits', ['engine.optimizer=torch'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

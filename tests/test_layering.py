"""Import layering: only engine.py imports deepspeed; model code is pure torch."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "maskdit_ds"


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

"""The tests' own rules: every pytest.raises names the message it expects, and the repository root, the tools/
scripts and shared fixtures come from tests/support/ or conftest.py, not from each test file."""
import ast

from repo import ROOT

TESTS = ROOT / "tests"
SHARED = {TESTS / "conftest.py", TESTS / "support" / "repo.py"}  # the two places that locate the checkout


def files_to_check():
    return [p for p in sorted(TESTS.rglob("*.py")) if p not in SHARED]


def label(path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else path.name


def raises_without_match(path) -> list[str]:
    return [f"{label(path)}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raises"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest"
            and not any(k.arg == "match" for k in node.keywords)]


def own_paths(path) -> list[str]:
    """Ways a file could work out where it is (the root) or load a tools/ script itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == "__file__":
            found.append(f"{label(path)}:{node.lineno} __file__")
        if isinstance(node, ast.Attribute) and node.attr in ("spec_from_file_location", "insert") and \
                ast.unparse(node.value) in ("importlib.util", "sys.path"):
            found.append(f"{label(path)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_every_pytest_raises_has_a_match():
    assert [hit for p in files_to_check() for hit in raises_without_match(p)] == []


def test_root_and_tools_come_from_tests_support():
    assert [hit for p in files_to_check() for hit in own_paths(p)] == []


def test_the_scans_would_catch_a_stray(tmp_path):
    stray = tmp_path / "test_stray.py"
    stray.write_text("import importlib.util, sys\nfrom pathlib import Path\nimport pytest\n"
                     "ROOT = Path(__file__).parent\nsys.path.insert(0, 'tools')\n"
                     "spec = importlib.util.spec_from_file_location('x', 'tools/x.py')\n"
                     "def test_x():\n    with pytest.raises(ValueError):\n        int('x')\n")
    assert raises_without_match(stray) == ["test_stray.py:8"]
    assert sorted(own_paths(stray)) == ["test_stray.py:4 __file__", "test_stray.py:5 sys.path.insert",
                                        "test_stray.py:6 importlib.util.spec_from_file_location"]

"""The README documents every config key and the two set-up commands CI relies on."""
from maskdit_ds.config import key_reference
from repo import ROOT


def test_readme_lists_every_config_key():
    readme = (ROOT / "README.md").read_text()
    keys = [line.split("`")[1] for line in key_reference().splitlines()[2:]]
    assert keys and [k for k in keys if f"`{k}`" not in readme] == []


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "bash tools/run_tests.sh" in readme and "bash tools/run_tests.sh" in ci
    assert "bash tools/run_example.sh" in readme

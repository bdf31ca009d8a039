"""Shortcut for `python -m maskdit_ds eval` (maskdit_ds/cli/evaluate.py); kept so existing scripts keep working."""
import os
import sys

try:
    import maskdit_ds  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskdit_ds.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

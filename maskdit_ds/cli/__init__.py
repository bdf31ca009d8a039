"""One module per `python -m maskdit_ds <command>` (see maskdit_ds/__main__.py); each has main(argv) -> exit code."""

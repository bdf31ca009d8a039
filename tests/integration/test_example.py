"""The built-in example exactly as README's first command runs it (slow: RUN_SLOW=1; about 3 min on 2 CPU cores)."""
import json
import subprocess

import numpy as np
import pytest
from launch import ROOT, command, env

from maskdit_ds.config import load_config


@pytest.mark.slow
def test_digits_example_samples_recognisable_digits(tmp_path):
    proc = subprocess.run(command(tmp_path, "digits", ["train.micro_batch=64"]), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:]
    run = tmp_path / "digits"
    samples = np.load(run / "samples.npz")
    side = load_config("digits").model.input_size  # pixels: the digits train in pixel space
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (400, side, side, 3)
    assert samples["arr_1"].shape == (400,) and set(np.unique(samples["arr_1"])) == set(range(10))
    assert (run / "samples.png").is_file()
    assert json.loads((run / "samples.json").read_text())["digits_class_agreement"] > 0.9

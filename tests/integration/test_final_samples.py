"""The final samples of a 2-rank run reach rank 0 through per-rank files (no gather holds every rank's pixels on
one device): samples.npz holds every image, and the parts are gone afterwards."""
import numpy as np

from launch import train


def test_final_samples_of_two_ranks_arrive_complete_through_files(tmp_path):
    proc = train(tmp_path, "run", ["train.steps=2", "sample.final_samples=7", "sample.steps=2"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    run = tmp_path / "run"
    with np.load(run / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (7,)
    assert not (run / "samples_parts").exists()
    assert (run / "samples.png").is_file() and (run / "samples.json").is_file()

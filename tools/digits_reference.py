"""The built-in example's real images as an .npz (arr_0 uint8 NHWC, arr_1 labels), to build its FID reference.

  python tools/digits_reference.py --out refs/digits_real.npz [--resolution 8] [--rounding floor]
  python -m maskdit_ds eval ref --images refs/digits_real.npz --out refs/digits_ref.npz --weights pt_inception-...pth
The 1,797 scikit-learn digits are resized exactly as the training data is (maskdit_ds/data/digits.py) and quantised
with the sampler's convention (to_uint8), grey repeated to RGB, so real and generated digits differ only in content.
"""

import argparse
import os
import sys

try:
    import maskdit_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from maskdit_ds.data.digits import DigitsDataset
from maskdit_ds.data.transforms import to_uint8


def real_digits(resolution: int = 8, rounding: str = "floor") -> tuple[np.ndarray, np.ndarray]:
    """uint8 (1797, R, R, 3) and int64 (1797,) labels."""
    digits = DigitsDataset(resolution)  # upscaled exactly as the trainer sees them
    return to_uint8(digits.x, rounding), digits.y.numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=".npz to write")
    p.add_argument("--resolution", type=int, default=8, help="data.resolution of the run (digits.yaml: 8)")
    p.add_argument("--rounding", choices=["floor", "round"], default="floor", help="match `python -m maskdit_ds sample`")
    a = p.parse_args(argv)
    images, labels = real_digits(a.resolution, a.rounding)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)
    print(f"wrote {a.out}: arr_0 {images.shape} {images.dtype}, arr_1 {labels.shape}")


if __name__ == "__main__":
    main()

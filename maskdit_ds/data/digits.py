"""The built-in example: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled, in pixel space."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float in [0, 1] and int64 labels, from the copy that ships inside scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def upscale(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> (N, 1, R, R) in [-1, 1] (bilinear, so strokes stay smooth)."""
    x = images.unsqueeze(1)
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


class DigitsDataset(Dataset):
    """{"x": (1, R, R) in [-1, 1], "y": int64}."""

    def __init__(self, resolution: int = 16):
        images, labels = load_digits_arrays()
        self.x = upscale(torch.from_numpy(images), resolution)
        self.y = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


class DigitsJudge:
    """A classifier trained on the real digits, used to check that generated digits show their class."""

    def __init__(self):
        from sklearn.svm import SVC

        images, labels = load_digits_arrays()
        self.clf = SVC(gamma="scale").fit(images.reshape(len(images), -1), labels)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """images (N, 1 or 3, R, R) in [-1, 1] -> predicted labels, after averaging back to 8x8."""
        x = images.float().mean(dim=1, keepdim=True)
        x = F.adaptive_avg_pool2d((x.clamp(-1, 1) + 1) / 2, 8)
        return self.clf.predict(x.reshape(len(x), -1).numpy())

    def agreement(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels.numpy()).mean())

"""Measures of synthetic volumes. Each function states its definition."""

from __future__ import annotations

import numpy as np


class NearestClassMean:
    """Does a volume follow its map? A voxel classifier that knows only each label's mean
    intensity in real images.

    ``fit`` learns, per label, the mean intensity of its voxels over real (image, map) pairs.
    ``balanced_accuracy(image, map)`` labels every voxel of ``image`` with the label whose mean
    is nearest, and returns the mean over labels present in ``map`` of the share of that label's
    voxels labelled correctly (chance: 1 / number of labels present). A synthetic volume that
    follows its map scores near what real images score; one that ignores it scores near chance,
    and so does a volume scored against another subject's map.
    """

    def __init__(self) -> None:
        self.labels: np.ndarray | None = None
        self.means: np.ndarray | None = None

    def fit(self, images: list[np.ndarray], maps: list[np.ndarray]) -> NearestClassMean:
        values = np.concatenate([np.ravel(i) for i in images])
        labels = np.concatenate([np.ravel(m) for m in maps]).astype(np.int64)
        self.labels = np.unique(labels)
        self.means = np.array([values[labels == label].mean() for label in self.labels])
        return self

    def predict(self, image: np.ndarray) -> np.ndarray:
        nearest = np.abs(np.asarray(image)[..., None] - self.means).argmin(axis=-1)
        return self.labels[nearest]

    def balanced_accuracy(self, image: np.ndarray, label_map: np.ndarray) -> float:
        predicted = self.predict(image)
        truth = np.asarray(label_map).astype(np.int64)
        recalls = [(predicted[truth == label] == label).mean() for label in np.unique(truth)]
        return float(np.mean(recalls))

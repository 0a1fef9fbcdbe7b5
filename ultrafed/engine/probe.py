"""Fast representation checks on a frozen encoder: linear probe and kNN.

Fine-tuning mixes what the encoder learned with what the task teaches; a frozen probe isolates
the former and costs one forward pass per image, cheap enough to score any registered encoder
(:func:`probe_task`; the flows do not call it, fine-tuning is what they register).
Features are the mean of the encoder's (normalised) patch tokens, the same pooling the
classification head uses. Classifiers are scikit-learn's; ``C`` is chosen on val.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ultrafed.data.tasks import TaskDataset, get_task, load_task
from ultrafed.engine.device import select_device
from ultrafed.engine.metrics import classification_metrics
from ultrafed.models.heads import adapt_encoder
from ultrafed.models.mae import ViTEncoder


@torch.no_grad()
def extract_features(encoder: ViTEncoder, loader: DataLoader, device: str | torch.device = "cpu") -> np.ndarray:
    """``[N, D]`` mean-pooled patch tokens of every image the loader yields (in its order)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.to(device).eval()
    feats = []
    try:
        for batch in loader:
            x = batch["image"] if isinstance(batch, dict) else batch[0]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                tokens = encoder(x.to(device))
            feats.append(tokens[:, 1:].float().mean(dim=1).cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.concatenate(feats) if feats else np.zeros((0, encoder.embed_dim), np.float32)


def full_proba(clf: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """``predict_proba`` spread over all classes (a class absent from train gets probability 0)."""
    p = clf.predict_proba(x)
    out = np.zeros((len(x), num_classes))
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = p
    return out


def _check(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{what}: no cases")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 num_classes: int, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), seed: int = 0,
                 test_x: np.ndarray | None = None, test_y: np.ndarray | None = None) -> dict[str, Any]:
    """Standardised features + logistic regression; ``C`` chosen by val AUROC.

    Returns ``{"C", "val": metrics, "test": metrics or None}`` (test only when given).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check(train_x, train_y, "linear probe train")
    _check(val_x, val_y, "linear probe val")
    best: tuple[float, float, Any, dict[str, float]] | None = None
    for c in Cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
        clf.fit(train_x, train_y)
        m = classification_metrics(val_y, full_proba(clf, val_x, num_classes))
        s = m["auroc"] if math.isfinite(m["auroc"]) else -math.inf
        if best is None or s > best[0]:
            best = (s, float(c), clf, m)
    assert best is not None
    test = None
    if test_x is not None and test_y is not None:
        _check(test_x, test_y, "linear probe test")
        test = classification_metrics(test_y, full_proba(best[2], test_x, num_classes))
    return {"C": best[1], "val": best[3], "test": test}


def knn_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray, *,
              num_classes: int, k: int = 20) -> dict[str, float]:
    """Cosine kNN, votes weighted by inverse distance (class probabilities -> AUROC), no training."""
    from sklearn.neighbors import KNeighborsClassifier

    _check(train_x, train_y, "kNN train")
    _check(eval_x, eval_y, "kNN eval")
    if k < 1:
        raise ValueError(f"kNN: k must be >= 1, got {k}")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine", weights="distance", algorithm="brute")
    clf.fit(train_x, train_y)
    return classification_metrics(eval_y, full_proba(clf, eval_x, num_classes))


def probe_task(task: str, root: str | Path, encoder: ViTEncoder, *, img_size: int | None = None,
               batch_size: int = 64, k: int = 20, seed: int = 0, device: str = "cpu",
               evaluate_test: bool = False) -> dict[str, Any]:
    """Linear probe and kNN of a frozen ``encoder`` on a classification task's fixed splits.

    Returns ``{"linear": {"C", "val", "test"}, "knn": {"val", "test"}, "n_train"}``; test
    entries are None unless ``evaluate_test``.
    """
    spec = get_task(task)
    if spec.kind != "cls":
        raise ValueError(f"probes need a classification task; {task} is segmentation")
    dev = select_device(device)
    enc = adapt_encoder(encoder, img_size or encoder.img_size)
    splits = ("train", "val", "test") if evaluate_test else ("train", "val")
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in splits:
        records, _ = load_task(task, root, split)
        ds = TaskDataset(records, spec, enc.img_size, train=False, seed=seed)
        if len(ds) == 0:
            raise ValueError(f"{root}: task {task} has no usable {split} images")
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
        feats[split] = (extract_features(enc, loader, dev), ds.labels)
    test = feats.get("test", (None, None))
    c = spec.num_classes
    lin = linear_probe(*feats["train"], *feats["val"], num_classes=c, seed=seed, test_x=test[0], test_y=test[1])
    knn = {"val": knn_probe(*feats["train"], *feats["val"], num_classes=c, k=k),
           "test": knn_probe(*feats["train"], *feats["test"], num_classes=c, k=k) if evaluate_test else None}
    return {"linear": lin, "knn": knn, "n_train": len(feats["train"][1])}

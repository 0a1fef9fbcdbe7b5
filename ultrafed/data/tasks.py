"""Downstream tasks: which site folder, which labels, which split -> tensors for fine-tuning.

A task is a named view on a site folder (``../shared/data/<name>`` or the synthetic cohort):
diagnosis reads one labels.csv column, segmentation reads the masks. Splits are the folder's
fixed ``split`` column (grouped so near-duplicates never cross), never re-drawn here.

Pixels match pretraining (:mod:`ultrafed.data.datasets`): one gray channel scaled to [0, 1],
no mean/std normalisation, so a pretrained encoder sees the input statistics it learned on.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ultrafed.data.io import ImageReadError, read_gray, read_mask
from ultrafed.data.sites import SiteError, SiteRecord, load_site

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Label values that mean "not known" (DDTI's malignant column is empty where TI-RADS is missing).
UNKNOWN_LABELS: frozenset[str] = frozenset({"", "unknown", "none", "nan", "na", "n/a"})
CROP_SCALE: tuple[float, float] = (0.8, 1.0)      # small crops: lesions near the border must stay in view
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["cls", "seg"]
    dataset: str | None          # folder under the data root; None = every site folder there (synthetic cohort)
    classes: tuple[str, ...] | None = None  # label values in class-index order (cls only)
    label_column: str | None = None         # labels.csv column holding them (cls only)

    @property
    def num_classes(self) -> int:
        """Output channels: the classes for diagnosis, one foreground channel for segmentation."""
        return len(self.classes) if self.classes else 1


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("busi-cls", "cls", "busi", ("normal", "benign", "malignant"), "label"),
    TaskSpec("busi-seg", "seg", "busi"),
    # DDTI: 0 = TI-RADS 2-3, 1 = TI-RADS 4a-5 (a TI-RADS proxy of malignancy); unknown rows skipped.
    TaskSpec("ddti-cls", "cls", "ddti", ("0", "1"), "malignant"),
    TaskSpec("ddti-seg", "seg", "ddti"),
    TaskSpec("hc18-seg", "seg", "hc18"),
    TaskSpec("synth-cls", "cls", None, ("normal", "benign", "malignant"), "label"),
    TaskSpec("synth-seg", "seg", None),
)}


def get_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    return TASKS[task]


def task_folders(spec: TaskSpec, root: str | Path) -> list[Path]:
    """Site folders of a task under ``root`` (``root`` may also be the dataset folder itself)."""
    root = Path(root)
    if spec.dataset is not None:
        for cand in (root / spec.dataset, root):
            if cand.name == spec.dataset and (cand / "labels.csv").is_file():
                return [cand]
        raise SiteError(f"{root / spec.dataset}: no '{spec.dataset}' site folder with labels.csv for task {spec.name}")
    if (root / "labels.csv").is_file():
        return [root]
    folders = sorted(d for d in root.iterdir() if (d / "labels.csv").is_file()) if root.is_dir() else []
    if not folders:
        raise SiteError(f"{root}: no site folders with labels.csv for task {spec.name} (make one with `ultrafed data synth`)")
    return folders


def load_task(task: str, root: str | Path, split: str | Sequence[str]) -> tuple[list[SiteRecord], list[str]]:
    """Records of ``task`` in ``split`` and one-line reasons for every row left out.

    Diagnosis drops rows whose label is unknown (see :data:`UNKNOWN_LABELS`) or not a class;
    segmentation drops rows without a mask. Problems of the site folder itself are passed on.
    """
    spec = get_task(task)
    wanted = {split} if isinstance(split, str) else set(split)
    records: list[SiteRecord] = []
    problems: list[str] = []
    for folder in task_folders(spec, root):
        site = load_site(folder)
        problems.extend(site.problems)
        for r in site.records:
            if r.split not in wanted:
                continue
            if spec.kind == "cls":
                value = r.labels.get(spec.label_column or "", "")
                if value.strip().lower() in UNKNOWN_LABELS:
                    problems.append(f"{r.image}: {spec.label_column} unknown; skipped for {spec.name}")
                    continue
                if value not in (spec.classes or ()):
                    problems.append(f"{r.image}: {spec.label_column}={value!r} is not one of "
                                    f"{', '.join(spec.classes or ())}; skipped for {spec.name}")
                    continue
            elif r.mask is None:
                problems.append(f"{r.image}: no mask; skipped for {spec.name}")
                continue
            records.append(r)
    return records, problems


def task_records(task: str, root: str | Path, split: str) -> list[SiteRecord]:
    """Records of ``task`` in ``split``; rows left out are summarised in the log (see :func:`load_task`)."""
    records, problems = load_task(task, root, split)
    if problems:
        log.info("%s/%s: %d row(s) left out, e.g. %s", task, split, len(problems), problems[0])
    return records


def class_index(spec: TaskSpec, record: SiteRecord) -> int:
    return (spec.classes or ()).index(record.labels[spec.label_column or ""])


def crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float] = CROP_SCALE,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """``(y0, x0, ch, cw)`` of a random-resized-crop draw (torchvision's rule); the whole frame
    when ten draws do not fit. One box serves an image and its mask."""
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


def _fit(gray: np.ndarray, longest: int) -> np.ndarray:
    h, w = gray.shape
    s = longest / max(h, w)
    if s >= 1.0:
        return gray
    return cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


class TaskDataset(Dataset):
    """Items ``{"image": [1,S,S] float in [0,1], "label": int}`` (cls) or ``... "mask": [1,S,S] 0/1`` (seg).

    Frames are decoded once and kept in memory, downscaled to at most ``2 * img_size`` a side
    (enough for crops, small for 1000-px exports). Unreadable images and masks that do not fit
    their image are left out with a one-line reason in :attr:`problems`. Training items get a
    horizontal flip and a small random resized crop, the image and its mask from one draw;
    item ``i`` of epoch ``e`` draws from a generator seeded by ``(seed, e, i)``. Frames are
    squashed to ``S x S`` (aspect not kept, as DDTI already is).
    """

    def __init__(self, records: Sequence[SiteRecord], spec: TaskSpec, img_size: int, train: bool = False,
                 seed: int = 0) -> None:
        if img_size < 8:
            raise ValueError(f"img_size must be >= 8, got {img_size}")
        self.spec, self.img_size, self.train, self.seed = spec, int(img_size), bool(train), int(seed)
        self.records: list[SiteRecord] = []
        self.problems: list[str] = []
        self._frames: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        labels: list[int] = []
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        for r in records:
            try:
                gray = read_gray(r.image)
                mask = None
                if spec.kind == "seg":
                    if r.mask is None:
                        self.problems.append(f"{r.image}: no mask")
                        continue
                    mask = read_mask(r.mask)
                    if mask.shape != gray.shape:
                        self.problems.append(f"{r.mask}: mask {mask.shape[1]}x{mask.shape[0]} does not match "
                                             f"image {gray.shape[1]}x{gray.shape[0]}")
                        continue
                label = class_index(spec, r) if spec.kind == "cls" else -1
            except ImageReadError as e:
                self.problems.append(str(e))
                continue
            except (KeyError, ValueError):
                self.problems.append(f"{r.image}: label {r.labels.get(spec.label_column or '', '')!r} is not a class of {spec.name}")
                continue
            frame = _fit(gray, 2 * self.img_size)
            self._frames.append(frame)
            if mask is not None:
                # NEAREST_EXACT samples pixel centres like the image resize; plain NEAREST shifts half a pixel
                m = cv2.resize(mask.astype(np.uint8), frame.shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
                self._masks.append(m)
            self.records.append(r)
            labels.append(label)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def frame(self, index: int) -> np.ndarray:
        """The cached uint8 ``[H, W]`` frame of item ``index``, before augmentation and resizing."""
        return self._frames[index]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation draws (shared with running workers)."""
        self._epoch.fill_(int(epoch))

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 image ``[S, S]`` and 0/1 mask (or None), augmented when training."""
        img = self._frames[index]
        mask = self._masks[index] if self.spec.kind == "seg" else None
        s = self.img_size
        if self.train:
            rng = np.random.default_rng([self.seed, int(self._epoch), int(index)])
            y0, x0, ch, cw = crop_box(*img.shape, rng)
            img = img[y0:y0 + ch, x0:x0 + cw]
            mask = mask[y0:y0 + ch, x0:x0 + cw] if mask is not None else None
            if rng.random() < 0.5:  # left-right only: depth (rows) has a direction in ultrasound
                img = img[:, ::-1]
                mask = mask[:, ::-1] if mask is not None else None
        interp = cv2.INTER_AREA if min(img.shape) >= s else cv2.INTER_LINEAR
        img = cv2.resize(np.ascontiguousarray(img), (s, s), interpolation=interp)
        if mask is not None:
            mask = cv2.resize(np.ascontiguousarray(mask), (s, s), interpolation=cv2.INTER_NEAREST_EXACT)
        return img, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        img, mask = self._arrays(index)
        out: dict[str, torch.Tensor | int] = {
            "image": torch.from_numpy(img.astype(np.float32) * (1.0 / 255.0)).unsqueeze(0),
            "index": int(index),
        }
        if mask is not None:
            out["mask"] = torch.from_numpy(mask.astype(np.float32)).unsqueeze(0)
        else:
            out["label"] = int(self.labels[index])
        return out

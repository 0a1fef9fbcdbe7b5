"""The UltraMIM training set of one site: clean targets, corrupted inputs, texture scores.

SMAT is *offline*, as in the official code: every readable image is held together with its copy
resampled into the other scan geometry (linear <-> convex), so a site with ``n`` files trains on
``2n`` images and ``len(dataset)`` -- the site's FedAvg weight -- is ``2n``. Everything that
costs per image (decode, crop, MIC corruption, texture scores) happens here, i.e. in the
DataLoader's workers, never in the training step.

Randomness: item ``i`` of epoch ``e`` draws from its own generator seeded by ``(seed, e, i)``,
so an item is the same whichever worker (or none) produces it. The epoch lives in shared
memory so :meth:`UltraMIMDataset.set_epoch` reaches persistent workers too.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ultrafed.data.io import ImageReadError, printable, read_gray
from ultrafed.ultramim.mic import corrupt
from ultrafed.ultramim.smat import PROBES, ScanGeometry, estimate_geometry, smat_convert
from ultrafed.ultramim.tgm import texture_scores

CROP_SCALE: tuple[float, float] = (0.5, 1.0)      # area fraction of the random resized crop
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # aspect range of the crop (resized to a square)


if TYPE_CHECKING:
    from ultrafed.config import Config, MICConfig


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop on a ``[H, W]`` array with an explicit generator -> ``[size, size]``."""
    h, w = img.shape
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # no draw fitted (very elongated frame): the largest centred crop within the ratio range
        if w / h < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif w / h > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = img[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if ch >= size and cw >= size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def _resolve_probe(gray: np.ndarray, probe: str | None) -> tuple[str, ScanGeometry | None]:
    """The record's probe (detected from the footprint when unknown) and, for a fan, its geometry."""
    geom = estimate_geometry(gray) if probe != "linear" else None
    if probe not in PROBES:  # "unknown", None, "": detect
        probe = "convex" if geom is not None else "linear"
    if probe == "convex" and geom is None:
        geom = ScanGeometry()  # recorded convex but no clear fan found: the default fan
    return probe, geom


def _shown(rec: Any) -> str:
    """How a record's file is named in messages: its site-relative ``relpath`` (SiteRecord),
    else the bare file name; never the absolute path, which says where the site keeps its data."""
    rel = getattr(rec, "relpath", "")
    return rel if rel and not rel.startswith("../") else printable(Path(rec.image).name)


class UltraMIMDataset(Dataset):
    """Items ``{"input": [1,S,S] (MIC), "target": [1,S,S] clean, "texture": [L]}``, float32 in [0, 1].

    ``smat_geometry`` is the fan that linear images are drawn into; convex images keep their own
    (estimated from the footprint). ``mic`` is :func:`ultrafed.ultramim.corrupt`'s keyword
    arguments, ``None`` for no corruption. Unreadable files are skipped; their one-line reasons
    (naming the file relative to its site) are in :attr:`problems`. ``cache`` keeps decoded (and SMAT-converted) uint8 frames in memory.
    """

    def __init__(self, records: Sequence[Any], *, img_size: int, patch_size: int, smat: bool,
                 smat_geometry: ScanGeometry | None = None, mic: Mapping[str, Any] | None = None,
                 seed: int = 0, cache: bool = True) -> None:
        if img_size % patch_size:
            raise ValueError(f"dataset: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.smat, self.cache = img_size, patch_size, bool(smat), cache
        self.smat_geometry = smat_geometry
        self.mic = dict(mic) if mic is not None else None
        self.seed = int(seed)
        self.problems: list[str] = []
        self.records: list[Any] = []
        self.probes: list[str] = []
        self._geoms: list[ScanGeometry | None] = []
        self._frames: list[np.ndarray] = []     # cached originals (cache=True)
        self._converted: list[np.ndarray] = []  # cached SMAT copies (cache=True and smat)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        for rec in records:
            try:
                gray = read_gray(rec.image)
            except ImageReadError as e:
                self.problems.append(f"{_shown(rec)}: {e.reason}")  # site-relative: problems leave the site
                continue
            probe, geom = _resolve_probe(gray, getattr(rec, "probe", None)) if self.smat else (getattr(rec, "probe", None) or "unknown", None)
            self.records.append(rec)
            self.probes.append(probe)
            self._geoms.append(geom)
            if cache:
                self._frames.append(gray)
                if self.smat:
                    self._converted.append(self._convert(gray, probe, geom))

    # -- size and epoch ---------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        """Readable source files (without SMAT copies)."""
        return len(self.records)

    def __len__(self) -> int:
        """Training images: ``2 * n_images`` with SMAT (each file plus its converted copy); the FedAvg weight."""
        return self.n_images * (2 if self.smat else 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation draws (shared with running workers)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    # -- frames -----------------------------------------------------------------------------
    def _convert(self, gray: np.ndarray, probe: str, geom: ScanGeometry | None) -> np.ndarray:
        # linear -> convex is drawn into the configured fan; convex -> linear unrolls the image's own fan
        out, _ = smat_convert(gray, probe, geometry=self.smat_geometry if probe == "linear" else geom)
        return out

    def gray(self, index: int) -> np.ndarray:
        """The uint8 ``[H, W]`` frame behind item ``index`` (an original or its SMAT copy), before augmentation."""
        if not 0 <= index < len(self):
            raise IndexError(f"dataset index {index} out of range (len {len(self)})")
        i, copy = index % self.n_images, index >= self.n_images
        if self.cache:
            return self._converted[i] if copy else self._frames[i]
        rec = self.records[i]
        try:
            g = read_gray(rec.image)
        except ImageReadError as e:  # changed on disk since construction: fail with the file named
            raise ImageReadError(_shown(rec), f"{e.reason} (readable when the dataset was built)") from None
        return self._convert(g, self.probes[i], self._geoms[i]) if copy else g

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch (seeded by seed, epoch, index)."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.item_rng(index)
        frame = random_resized_crop(self.gray(index), self.img_size, rng)
        if rng.random() < 0.5:
            frame = frame[:, ::-1]
        clean = np.ascontiguousarray(frame, dtype=np.float32) * (1.0 / 255.0)  # [S, S]
        target = torch.from_numpy(clean).unsqueeze(0)                              # [1, S, S]
        texture = texture_scores(target.unsqueeze(0), self.patch_size)[0]           # [L], of the clean image
        inp = target if self.mic is None else torch.from_numpy(corrupt(clean, rng, **self.mic)).unsqueeze(0)
        return {"input": inp, "target": target, "texture": texture}


def mic_kwargs(mic_cfg: "MICConfig") -> dict[str, Any] | None:
    """``cfg.ultramim.mic`` -> :func:`corrupt` keyword arguments, or ``None`` when MIC is off."""
    if not mic_cfg.enabled:
        return None
    return {"p": mic_cfg.p, "p_each": mic_cfg.p_each, "motion_kernel": mic_cfg.motion_kernel,
            "gauss_sigma": mic_cfg.gauss_sigma, "sp_amount": mic_cfg.sp_amount, "ref_size": mic_cfg.ref_size}


def dataset_from_config(records: Sequence[Any], cfg: "Config", seed: int | None = None) -> UltraMIMDataset:
    """The training set as ``params.yaml`` describes it (model size, SMAT fan, MIC, cache)."""
    um = cfg.ultramim
    return UltraMIMDataset(records, img_size=cfg.model.img_size, patch_size=cfg.model.patch_size,
                           smat=um.smat.enabled,
                           smat_geometry=ScanGeometry(angle_deg=um.smat.angle_deg, r_min_frac=um.smat.r_min_frac),
                           mic=mic_kwargs(um.mic), seed=cfg.seed if seed is None else seed,
                           cache=cfg.pretrain.cache_images)


class EpochSampler(Sampler[int]):
    """Shuffled order as a pure function of ``(seed, epoch)``, the epoch read from the dataset.

    A stateful generator would not do: with persistent workers the DataLoader stops drawing
    from it after the first epoch, so 0 and N workers would see different orders, and a resumed
    run would not repeat an uninterrupted one.
    """

    def __init__(self, ds: Dataset, seed: int, shuffle: bool = True) -> None:
        self.ds, self.seed, self.shuffle = ds, int(seed), shuffle
        self._calls = 0  # epoch stand-in for datasets without one

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self):
        epoch = getattr(self.ds, "epoch", None)
        epoch = self._calls if epoch is None else int(epoch)
        self._calls += 1
        if not self.shuffle:
            return iter(range(len(self.ds)))
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return iter(torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(seed)).tolist())


def make_loader(ds: Dataset, batch_size: int, num_workers: int, seed: int, shuffle: bool = True,
                drop_last: bool | None = None) -> DataLoader:
    """A DataLoader whose order depends only on ``(seed, dataset epoch)``; persistent workers when ``num_workers > 0``.

    ``drop_last=None`` drops the ragged last batch only when at least one full batch exists, so a
    site smaller than a batch still trains (one step per epoch). Workers leave OpenCV's thread
    pool alone: ``cv2.setNumThreads`` in a forked worker can deadlock on the parent's pool.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"make_loader: need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    if drop_last is None:
        drop_last = len(ds) >= batch_size
    gen = torch.Generator().manual_seed(int(seed))  # only feeds the workers' (unused) torch seeds
    return DataLoader(ds, batch_size=batch_size, sampler=EpochSampler(ds, seed, shuffle), drop_last=drop_last,
                      num_workers=num_workers, generator=gen, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available())

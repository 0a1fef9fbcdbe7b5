"""UltraMIM's three additions to MAE pretraining.

- :mod:`.smat` scanning-mode augmentation: linear <-> convex probe geometry.
- :mod:`.mic` mixed image corruption of the encoder input (the target stays clean).
- :mod:`.tgm` texture-guided masking: textured patches are masked more often.
"""
from ultrafed.ultramim.mic import corrupt, corrupt_ops, gaussian_blur, motion_blur, salt_pepper
from ultrafed.ultramim.smat import (ScanGeometry, convex_to_linear, detect_probe, estimate_geometry,
                                    linear_to_convex, sector_mask, smat_convert)
from ultrafed.ultramim.tgm import texture_scores, tgm_mask, tgm_noise

__all__ = [
    "ScanGeometry", "convex_to_linear", "corrupt", "corrupt_ops", "detect_probe", "estimate_geometry",
    "gaussian_blur", "linear_to_convex", "motion_blur", "salt_pepper", "sector_mask", "smat_convert",
    "texture_scores", "tgm_mask", "tgm_noise",
]

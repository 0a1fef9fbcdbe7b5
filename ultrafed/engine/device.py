"""Where training runs: one explicit choice instead of ``cuda if available`` scattered around."""
from __future__ import annotations

import torch

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def select_device(pref: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without a GPU is an error, not a silent CPU run."""
    pref = (pref or "auto").lower()
    if pref not in DEVICE_CHOICES:
        raise ValueError(f"device: unknown choice '{pref}' (choose from {', '.join(DEVICE_CHOICES)})")
    if pref == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if pref == "cuda":
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device("cpu")

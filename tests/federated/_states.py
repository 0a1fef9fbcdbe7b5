"""Tiny hand-checkable states shared by the federated tests (2 float tensors + 1 int buffer)."""
from __future__ import annotations

import torch

from ultrafed.federated import SiteUpdate

F64 = torch.float64


def st(w: list[float], b: list[float], steps: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w, dtype=F64), "b": torch.tensor(b, dtype=F64),
            "steps": torch.tensor(steps, dtype=torch.int64)}


def zeros() -> dict[str, torch.Tensor]:
    return st([0.0, 0.0], [0.0])


# five sites; A and B are the two-site case, A-C odd K, A-D even K, A-E the trimmed-mean case
A = SiteUpdate("A", st([1.0, 2.0], [0.0], steps=11), n=1)
B = SiteUpdate("B", st([3.0, 6.0], [4.0], steps=33), n=3)
C = SiteUpdate("C", st([2.0, -1.0], [10.0], steps=22), n=2)
D = SiteUpdate("D", st([0.0, 5.0], [1.0], steps=44), n=3)
E = SiteUpdate("E", st([100.0, -100.0], [7.0], steps=55), n=1)

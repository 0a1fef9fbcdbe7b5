"""Wire encoding of model states between a site and the coordinator.

A ViT-B update is ~344 MB in float32; bfloat16 halves it. Rounding the *weights* to bf16 costs
~0.4 % of each weight, which is as large as one round's change, so the useful mode encodes
the *delta* against the global state both ends already hold (``reference``): the 0.4 % then
applies to the small update instead of to the weights. Only float tensors are converted;
integer/bool buffers travel unchanged.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor

State = dict[str, Tensor]

TRANSFER_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def transfer_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` (or the torch dtype itself) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name in TRANSFER_DTYPES.values():
            return name
    elif name in TRANSFER_DTYPES:
        return TRANSFER_DTYPES[name]
    raise ValueError(f"transfer dtype {name!r} not supported; use one of {sorted(TRANSFER_DTYPES)}")


def _float_dtype(name: str | torch.dtype) -> torch.dtype:
    """Any float dtype a decoded state may take (training may want float64 in tests)."""
    dt = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"decode dtype {name!r} is not a float dtype")
    return dt


def _check_reference(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], who: str) -> None:
    missing = [k for k in state if k not in reference]
    if missing:
        raise ValueError(f"{who}: reference state lacks {len(missing)} key(s), first {missing[0]!r}")


def encode_state(state: Mapping[str, Tensor], dtype: str | torch.dtype = "float32",
                 reference: Mapping[str, Tensor] | None = None) -> State:
    """Float tensors cast to ``dtype``; with ``reference``, the delta ``state - reference`` is sent.

    The delta is formed in float32 (or the state's wider dtype) before rounding, so bf16 error is
    relative to the update, not to the weights.
    """
    target = transfer_dtype(dtype)
    if reference is not None:
        _check_reference(state, reference, "encode_state")
    out: State = {}
    for k, t in state.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        if reference is not None:
            wide = torch.promote_types(t.dtype, torch.float32)
            t = t.to(wide) - reference[k].to(wide)
            out[k] = t.to(target)
        else:
            out[k] = t.to(target, copy=True)
    return out


def decode_state(encoded: Mapping[str, Tensor], dtype: str | torch.dtype | None = "float32",
                 reference: Mapping[str, Tensor] | None = None) -> State:
    """Inverse of :func:`encode_state`: float tensors back to ``dtype`` (the reference's own dtype
    per tensor when ``reference`` is given and ``dtype`` is None), adding the reference back."""
    if reference is not None:
        _check_reference(encoded, reference, "decode_state")
    target = None if dtype is None else _float_dtype(dtype)
    if target is None and reference is None:
        raise ValueError("decode_state: dtype=None needs a reference to take dtypes from")
    out: State = {}
    for k, t in encoded.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        want = target if target is not None else reference[k].dtype  # type: ignore[index]
        if reference is not None:
            wide = torch.promote_types(want, torch.float32)
            out[k] = (reference[k].to(wide) + t.to(wide)).to(want)
        else:
            out[k] = t.to(want, copy=True)
    return out


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' payload (what a raw transfer of this state carries)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def encoded_nbytes(state: Mapping[str, Tensor], dtype: str | torch.dtype = "float32") -> int:
    """Payload bytes of ``encode_state(state, dtype)`` without building it."""
    item = torch.empty((), dtype=transfer_dtype(dtype)).element_size()
    return int(sum(t.numel() * (item if t.is_floating_point() else t.element_size())
                   for t in state.values()))


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in key order.

    Independent of pickle framing and file layout, so the same weights hash the same whether
    they came from ``torch.save``, an MLflow model or memory.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        if not isinstance(t, Tensor):
            raise TypeError(f"state entry '{k}' is {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()

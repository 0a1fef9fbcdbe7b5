"""Task heads on the federated ViT encoder: diagnosis (classification) and lesion segmentation.

Both keep the encoder as ``.encoder`` so layer-wise lr decay and the registry find it by name.
Classification follows MAE's fine-tuning recipe (mean of patch tokens, a fresh LayerNorm, a
linear layer): pooling all patches uses the whole image, which MAE found better than the cls
token after masked pretraining. Segmentation is a light UNETR: plain ViTs have one resolution
(1/16), so features from several depths are lifted to increasing resolutions and merged by a
convolutional decoder, with a small conv stem on the image for full-resolution edges.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ultrafed.models.mae import ViTEncoder


def adapt_encoder(encoder: ViTEncoder, img_size: int) -> ViTEncoder:
    """A copy of ``encoder`` for ``img_size`` inputs (the caller's weights are never trained in place).

    Positions are fixed sin-cos (a non-persistent buffer), so a different size only rebuilds
    that buffer; every learned weight carries over unchanged.
    """
    if img_size == encoder.img_size:
        return copy.deepcopy(encoder)
    if img_size % encoder.patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of the encoder's patch size {encoder.patch_size}")
    new = ViTEncoder(img_size=img_size, patch_size=encoder.patch_size, in_chans=encoder.in_chans,
                     embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                     mlp_ratio=encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim)
    new.load_state_dict(encoder.state_dict())
    return new


class ClassificationModel(nn.Module):
    """``[N, C, H, W]`` -> class logits ``[N, num_classes]``."""

    def __init__(self, encoder: ViTEncoder, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(encoder.embed_dim)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor) -> Tensor:
        """Mean-pooled patch tokens ``[N, D]`` (what linear probes and kNN read)."""
        return self.fc_norm(self.encoder(x)[:, 1:].mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU: the U-Net unit."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


def _default_channels(stages: int) -> tuple[int, ...]:
    """UNETR's widths for feature size 16: 128, 64, 32, 16 (halving as resolution doubles)."""
    return tuple(max(16, 128 >> i) for i in range(stages))


class SegmentationModel(nn.Module):
    """UNETR-lite: ``[N, C, H, W]`` -> mask logits ``[N, num_classes, H, W]``.

    With patch 16 there are four x2 stages (grid -> H). Stage ``j`` (1-based) upsamples the
    decoder state and concatenates the ``j``-th deepest extra ViT feature, itself lifted by a
    stride-``2**j`` transposed conv; the last stage concatenates a conv stem of the image.
    ``feature_layers`` are block indices, shallow to deep; the deepest seeds the decoder.
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int = 1, feature_layers: Sequence[int] = (2, 5, 8, 11),
                 decoder_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        p = encoder.patch_size
        stages = int(round(math.log2(p)))
        if 2 ** stages != p:
            raise ValueError(f"patch_size {p} is not a power of two; the decoder upsamples by 2 per stage")
        layers = tuple(int(i) for i in feature_layers)
        if not layers or any(not 0 <= i < encoder.depth for i in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"feature_layers {layers} must be distinct increasing block indices in [0, {encoder.depth})")
        if len(layers) > stages:
            raise ValueError(f"{len(layers)} feature layers but only {stages} decoder stages for patch {p}")
        chans = tuple(decoder_channels) if decoder_channels is not None else _default_channels(stages)
        if len(chans) != stages:
            raise ValueError(f"decoder_channels needs {stages} entries (one per x2 stage), got {len(chans)}")
        self.encoder, self.feature_layers, self.num_classes = encoder, layers, num_classes
        d = encoder.embed_dim
        skips = list(reversed(layers[:-1]))  # second deepest first: it joins stage 1
        self.ups = nn.ModuleList()
        self.lifts = nn.ModuleList()
        self.blocks = nn.ModuleList()
        c_prev = d
        for j, c in enumerate(chans, start=1):
            self.ups.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            if j <= len(skips):
                s = 2 ** j
                self.lifts.append(nn.Sequential(nn.ConvTranspose2d(d, c, s, stride=s), ConvBlock(c, c)))
            elif j == stages:
                self.lifts.append(ConvBlock(encoder.in_chans, c))  # image stem at full resolution
            else:
                self.lifts.append(nn.Identity())
            has_skip = j <= len(skips) or j == stages
            self.blocks.append(ConvBlock(2 * c if has_skip else c, c))
            c_prev = c
        self._n_skips = len(skips)  # < stages, so the last stage always takes the image stem
        self.out = nn.Conv2d(c_prev, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encoder.forward_intermediates(x, self.feature_layers)  # shallow -> deep, [N, D, g, g]
        h = feats[-1]
        skips = list(reversed(feats[:-1]))
        for j, (up, lift, block) in enumerate(zip(self.ups, self.lifts, self.blocks)):
            h = up(h)
            if j < self._n_skips:
                h = torch.cat([h, lift(skips[j])], dim=1)
            elif j == len(self.blocks) - 1:
                h = torch.cat([h, lift(x)], dim=1)
            h = block(h)
        return self.out(h)

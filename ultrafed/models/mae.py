"""Masked autoencoder (He et al., 2022) on timm's ``PatchEmbed`` and ``Block``.

The encoder is its own module (:class:`ViTEncoder`) because it is what the federation
produces, the registry versions and the task heads fine-tune; the decoder exists only for
pretraining. Masks come from outside (``ultrafed.ultramim.tgm_mask``) or are drawn uniformly
here, so UltraMIM and plain MAE share one forward pass.
"""
from __future__ import annotations

import copy
import functools

from dataclasses import dataclass
from typing import Sequence

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

# ViT-Ti/S/B as in DeiT/ViT; the paper uses base (ViT-B/16 at 224 px).
ENCODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[1 (+1), grid*grid, dim]`` (MAE's, half per axis)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sin-cos")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def axis(pos: Tensor) -> Tensor:  # [G*G] -> [G*G, dim/2]
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([axis(xs), axis(ys)], dim=1)  # [L, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViTEncoder(nn.Module):
    """ViT encoder with fixed sin-cos positions; ``keep_idx`` runs it on visible patches only."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 1,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(_init_weights)
        self.norm.apply(_init_weights)

    def tokens(self, x: Tensor, keep_idx: Tensor | None = None) -> Tensor:
        """Patch + position embedding, visible patches only, cls prepended: ``[N, 1+K, D]``."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # [N, L, D]
        if keep_idx is not None:  # keep_idx: [N, K]
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward(self, x: Tensor, keep_idx: Tensor | None = None) -> Tensor:
        """``[N, C, H, W]`` -> normalised tokens ``[N, 1+K, D]`` (K = L without ``keep_idx``)."""
        x = self.tokens(x, keep_idx)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        """Patch tokens after the given blocks as maps ``[N, D, grid, grid]`` (for segmentation)."""
        want = {i % self.depth for i in indices}
        feats: list[Tensor] = []
        x = self.tokens(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in want:
                t = (self.norm(x) if i == self.depth - 1 else x)[:, 1:]
                feats.append(t.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid))
        return feats


@dataclass
class MAEOutput:
    loss: Tensor  # scalar: mean per-patch MSE over masked patches
    pred: Tensor  # [N, L, p*p*C] reconstruction in (normalised) patch space
    mask: Tensor  # [N, L] bool, True = masked


class MaskedAutoencoderViT(nn.Module):
    """MAE: encoder on visible patches, light transformer decoder, loss on masked patches."""

    def __init__(self, encoder: ViTEncoder, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        p, c = encoder.patch_size, encoder.in_chans
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, encoder.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * c)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(_init_weights)

    # -- patch space ------------------------------------------------------------------------
    def patchify(self, imgs: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, L, p*p*C]`` (row-major patches, like MAE)."""
        p, g, c = self.encoder.patch_size, self.encoder.grid, self.encoder.in_chans
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """``[N, L, p*p*C]`` -> ``[N, C, H, W]``; the inverse of :meth:`patchify`."""
        p, g, c = self.encoder.patch_size, self.encoder.grid, self.encoder.in_chans
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def random_mask(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
        """MAE's uniform masking: ``[N, L]`` bool with exactly ``int(L * mask_ratio)`` True per row."""
        L = self.encoder.num_patches
        n_mask = int(L * self.mask_ratio)
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(n, L, generator=generator, device=gen_device).to(device)  # a CPU generator serves CUDA too
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return ranks >= L - n_mask

    # -- forward ----------------------------------------------------------------------------
    def forward_decoder(self, latent: Tensor, keep_idx: Tensor) -> Tensor:
        """Encoded visible tokens ``[N, 1+K, D]`` -> predictions for all patches ``[N, L, p*p*C]``."""
        x = self.decoder_embed(latent)
        n, L = x.shape[0], self.encoder.num_patches
        full = self.mask_token.to(x.dtype).expand(n, L, -1).clone()  # bf16 under autocast, like x
        full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, target: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Per-patch MSE (normalised pixels if ``norm_pix_loss``), averaged over masked patches."""
        t = self.patchify(target)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - t.float()) ** 2).mean(dim=-1)  # [N, L]
        m = mask.float()
        return (per_patch * m).sum() / m.sum().clamp_min(1.0)

    def forward(self, imgs: Tensor, mask: Tensor | None = None, target: Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """Reconstruct ``target`` (default ``imgs``) from the visible patches of ``imgs``.

        imgs: [N, C, H, W] (possibly corrupted by MIC); target: the clean images;
        mask: [N, L] bool, True = masked, the same count per row (TGM or uniform).
        """
        if mask is None:
            mask = self.random_mask(imgs.shape[0], generator, imgs.device)
        L = self.encoder.num_patches
        if mask.shape != (imgs.shape[0], L):
            raise ValueError(f"mae: mask must be [N, L] = [{imgs.shape[0]}, {L}], got {tuple(mask.shape)}")
        visible = (~mask).sum(dim=1)
        n_keep = int(visible[0])
        if bool((visible != n_keep).any()):  # unequal rows would leak masked patches into the encoder
            raise ValueError(f"mae: every mask row must hide the same number of patches, got visible counts {visible.tolist()}")
        keep_idx = (mask.to(torch.int8)).argsort(dim=1, stable=True)[:, :n_keep]  # [N, K], ascending positions
        latent = self.encoder(imgs, keep_idx)
        pred = self.forward_decoder(latent, keep_idx)
        loss = self.loss(imgs if target is None else target, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask)

    def reconstruct(self, pred: Tensor, target: Tensor) -> Tensor:
        """Predictions back in image space (undoing norm_pix with the target's patch stats), for pictures."""
        if self.norm_pix_loss:
            t = self.patchify(target)
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        return self.unpatchify(pred)


def build_encoder(preset: str = "tiny", img_size: int = 224, patch_size: int = 16, in_chans: int = 1) -> ViTEncoder:
    """Named encoder factory (tiny / small / base)."""
    if preset not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset '{preset}' (choose from {', '.join(ENCODER_PRESETS)})")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    return ViTEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **ENCODER_PRESETS[preset])


def build_mae(preset: str = "tiny", img_size: int = 224, patch_size: int = 16, in_chans: int = 1,
              decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
              mask_ratio: float = 0.75, norm_pix_loss: bool = True, seed: int | None = None) -> MaskedAutoencoderViT:
    """MAE with a named encoder; ``seed`` makes the initial weights reproducible without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        enc = build_encoder(preset, img_size, patch_size, in_chans)
        return MaskedAutoencoderViT(enc, decoder_dim, decoder_depth, decoder_heads, mask_ratio, norm_pix_loss)


def mae_from_config(model_cfg, seed: int | None = None) -> MaskedAutoencoderViT:
    """Explode a :class:`ultrafed.config.ModelConfig` into :func:`build_mae` arguments."""
    return build_mae(model_cfg.preset, model_cfg.img_size, model_cfg.patch_size, model_cfg.in_chans,
                     model_cfg.decoder_dim, model_cfg.decoder_depth, model_cfg.decoder_heads,
                     model_cfg.mask_ratio, model_cfg.norm_pix_loss, seed)


@functools.lru_cache(maxsize=4)
def _template(model_cfg) -> MaskedAutoencoderViT:
    return mae_from_config(model_cfg, seed=0).eval()


def blank_mae(model_cfg) -> MaskedAutoencoderViT:
    """A model whose weights the caller overwrites at once (``load_state_dict``): a copy of one
    cached instance per config, which skips the random initialisation (a third of a tiny site
    action's time on a CPU). ``model_cfg`` is a frozen :class:`ultrafed.config.ModelConfig`."""
    return copy.deepcopy(_template(model_cfg)).train()


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())



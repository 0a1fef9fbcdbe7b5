"""Models: the ViT encoder, the masked autoencoder around it, and task heads."""
from ultrafed.models.mae import (
    ENCODER_PRESETS,
    MAEOutput,
    MaskedAutoencoderViT,
    ViTEncoder,
    build_encoder,
    build_mae,
)

__all__ = ["ENCODER_PRESETS", "MAEOutput", "MaskedAutoencoderViT", "ViTEncoder", "build_encoder", "build_mae"]

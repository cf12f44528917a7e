"""Named model sizes. Official sizes match models_mae.py; the small ones are for CPUs and tests."""
import dataclasses

from mae_jax.models.mae import MaskedAutoencoder

_DECODER_512D8B = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

MODELS = {
    # Official (the "dec512d8b" decoder of the release).
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                 num_heads=12, **_DECODER_512D8B),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24,
                                  num_heads=16, **_DECODER_512D8B),
    "mae_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32,
                                 num_heads=16, **_DECODER_512D8B),
    # 32x32 inputs, patch 4 (64 tokens). ViT-Ti widths: the CPU benchmark size.
    "mae_vit_tiny_patch4": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # Fashion-MNIST default: trains to a clearly falling loss on a 2-core CPU in minutes.
    "mae_vit_small_patch4": dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # Unit tests: compiles in seconds.
    "mae_vit_test_patch4": dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
}

_FIELDS = {f.name for f in dataclasses.fields(MaskedAutoencoder)} - {"parent", "name"}


def create_model(name: str, **overrides) -> MaskedAutoencoder:
  """Builds a named MAE; any field (mask_ratio, norm_pix_loss, decoder_depth, ...) can be overridden."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(sorted(MODELS))}.")
  unknown = set(overrides) - _FIELDS
  if unknown:
    raise ValueError(f"Unknown model option(s) {sorted(unknown)} for {name!r}; "
                     f"valid options: {', '.join(sorted(_FIELDS))}.")
  return MaskedAutoencoder(**{**MODELS[name], **overrides})

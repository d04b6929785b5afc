"""Model definitions; `build_model` turns the config's model section into a module."""

from atoken.train.model.patch_autoencoder import PatchAutoencoder, build_model

__all__ = ["PatchAutoencoder", "build_model"]

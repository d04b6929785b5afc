"""Losses return a dict of named terms; the weighted sum and the logging both read that dict."""

from atoken.train.losses.reconstruction import packed_reconstruction_losses, reconstruction_losses, weighted_total

__all__ = ["packed_reconstruction_losses", "reconstruction_losses", "weighted_total"]

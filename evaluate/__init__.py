"""Reconstruction and understanding metrics, each with its protocol recorded beside the number."""

"""The model, its losses, streaming data and the staged training loop (run by Ray Train)."""

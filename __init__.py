"""atoken: the data, training and evaluation pipeline for a unified visual tokenizer.

The repository's top-level folders are this package's subpackages (see pyproject.toml):
atoken.pipeline, atoken.preprocess, atoken.train, atoken.evaluate.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from atoken import Tokenizer` without importing torch for every `atoken` CLI call.
    if name == "Tokenizer":
        from atoken.train.model.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'atoken' has no attribute {name!r}")

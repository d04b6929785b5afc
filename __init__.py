"""atoken: the data, training and evaluation pipeline for a unified visual tokenizer.

The repository's top-level folders are this package's subpackages (see pyproject.toml):
atoken.pipeline, atoken.preprocess, atoken.train, atoken.evaluate.
"""

__version__ = "0.1.0"

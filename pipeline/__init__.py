"""The workflow: one config, a DAG of fingerprinted stages, storage, tracking and the CLI."""

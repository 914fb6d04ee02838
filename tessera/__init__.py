"""Tessera: self-hosted fine-tuning of foundation models (data prep -> train -> register -> serve).

Kept import-light on purpose: the CLI imports this package before it knows what it will run.
"""

__version__ = "0.1.0"

"""loraplex: serve many LoRA and DoRA task adapters on one frozen base model."""

__version__ = "0.1.0"

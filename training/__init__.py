"""Synthetic-data LoRA/DoRA task adapters for the default base model: data, training, evaluation, demo."""

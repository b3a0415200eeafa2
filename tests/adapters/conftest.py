"""Session fixtures: tiny real base models and real PEFT adapters saved with save_pretrained."""

from adapter_fixtures import adapters, bases, copy  # noqa: F401

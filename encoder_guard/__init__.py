"""encoder_guard: pretrain, attack, defend and evaluate self-supervised image encoders against backdoors."""

__version__ = "0.1.0"

"""Encoders: backbone registry, the :class:`Encoder` wrapper, checkpoint I/O and importers."""

from encoder_guard.encoders.backbones import BACKBONES, build_backbone, make_spec
from encoder_guard.encoders.checkpoint import read_weights, save_encoder
from encoder_guard.encoders.encoder import TAP_NAMES, Encoder
from encoder_guard.encoders.importers import FORMATS, load_encoder
from encoder_guard.encoders.spec import EncoderSpec

__all__ = ["BACKBONES", "FORMATS", "TAP_NAMES", "Encoder", "EncoderSpec", "build_backbone", "load_encoder",
           "make_spec", "read_weights", "save_encoder"]

"""Triggers: patch, blend, CTRL frequency and WaNet warping triggers, applied on ``[0, 1]`` images, saved bit-exactly."""

from encoder_guard.triggers.base import TRIGGERS, Trigger
from encoder_guard.triggers.blend import BlendTrigger
from encoder_guard.triggers.ctrl import CTRLTrigger
from encoder_guard.triggers.factory import build_trigger
from encoder_guard.triggers.io import load_reference_images, load_trigger, save_reference_images, save_trigger
from encoder_guard.triggers.patch import PatchTrigger
from encoder_guard.triggers.warp import WarpTrigger

__all__ = ["TRIGGERS", "BlendTrigger", "CTRLTrigger", "PatchTrigger", "Trigger", "WarpTrigger", "build_trigger",
           "load_reference_images", "load_trigger", "save_reference_images", "save_trigger"]

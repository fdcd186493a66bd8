"""Backbones: timm ViTs at the run's resolution, the shared classifier wrapper, split q/k/v, peft helpers."""

"""sia: Strength-controllable Diffusion Anomaly Synthesis and reusable anomaly augmentation."""

__version__ = "0.1.0"

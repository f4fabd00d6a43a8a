"""realnet: the RealNet feature-selection anomaly detector (CVPR 2024)."""

__version__ = "0.1.0"

"""efpn: Extended Feature Pyramid Network for small-object detection."""

__version__ = "0.1.0"

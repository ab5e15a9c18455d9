"""efpn: Extended Feature Pyramid Network for small-object detection."""

__version__ = "0.1.0"

__all__ = ["__version__", "predict_sliced"]


def __getattr__(name: str):
    # lazy, so `efpn --help` and the data commands start without importing torch
    if name == "predict_sliced":
        from .slicing import predict_sliced

        return predict_sliced
    raise AttributeError(f"module 'efpn' has no attribute {name!r}")

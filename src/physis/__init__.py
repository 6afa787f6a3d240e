"""physis: an end-to-end foundation model for the physical world."""

__version__ = "0.1.0"

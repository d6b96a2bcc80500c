"""distilflow: labeled data in, a small, fast, registered model out."""

__version__ = "0.1.0"

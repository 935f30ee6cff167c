"""qrobust: small, fast and provably robust neural networks."""

__version__ = "0.1.0"

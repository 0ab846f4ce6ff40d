"""InferWatch: a streaming runtime security monitor for deployed ML models."""

__version__ = "0.1.0"

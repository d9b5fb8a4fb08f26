"""fusion: multimodal (image + text) sentiment analysis with cached frozen-encoder embeddings and small fusion heads."""

__version__ = "0.1.0"

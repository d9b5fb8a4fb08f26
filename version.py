"""fusion's version: recorded in every cache fingerprint and run, and shown by `fusion --version`."""

__version__ = "0.1.0"

"""AstrID: find supernovae by comparing images taken at different times."""

__version__ = "0.1.0"

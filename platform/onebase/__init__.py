"""onebase: one pretrained base, many task specialists, served side by side."""

__version__ = "0.1.0"

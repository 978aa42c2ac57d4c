"""slm: pre-train small GPT-style language models on TinyStories."""

__version__ = "0.1.0"

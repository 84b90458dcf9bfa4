"""megadistil: distil a full-precision LLM into a BitNet b1.58 student on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"

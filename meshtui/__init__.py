"""meshtui: run one LLM across the machines you can SSH into, from one terminal."""

__version__ = "0.1.0"

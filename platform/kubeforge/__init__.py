"""KubeForge: the whole life of a language model from one declarative manifest."""

__version__ = "0.1.0"

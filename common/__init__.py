"""mtpd: pipeline-parallel LLM inference accelerated by multi-token prediction."""

__version__ = "0.1.0"

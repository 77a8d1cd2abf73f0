"""goca_fast: fast, reliable GOCA (Guided Online Cluster Assignment) for two-stream video SSL."""

__version__ = "0.1.0"

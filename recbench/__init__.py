"""recbench: one data pipeline and one evaluator for sequential and generative recommendation."""

__version__ = "0.1.0"

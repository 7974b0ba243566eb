"""gqaprune: GQA-aware structured pruning of decoder-only LLMs (core library).

Pure functions and dataclasses; imports neither mlflow nor argparse.
"""
__version__ = "0.1.0"

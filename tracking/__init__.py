"""The only door to MLflow besides the entry points. Logs plain dicts, files and figures.

``UserError`` is re-exported for ``analysis/``, which imports ``tracking`` only.
"""
from gqaprune.errors import UserError  # noqa: F401

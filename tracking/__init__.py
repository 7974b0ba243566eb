"""The only door to MLflow besides the entry points. Logs plain dicts, files and figures."""

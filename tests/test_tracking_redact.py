"""Credentials never leave tracking/ in clear: URLs, query values, secret environment values, logs."""
import logging

import pytest

from tracking.redact import MASK, RedactingFilter, install_log_filter, redact


@pytest.mark.parametrize("text, expected", [
    ("http://alice:s3cret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("see https://tok3n@host.example/api/2.0 now", "see https://***@host.example/api/2.0 now"),
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    ("http://u:p@ss@host/x", "http://***@host/x"),           # an unencoded '@' in the password
    ("'http://u:pw@h:1/a' and 'http://v:qw@g:2/b'", "'http://***@h:1/a' and 'http://***@g:2/b'"),
    ("https://host/api?token=abc123&x=1", "https://host/api?token=***&x=1"),
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),   # a path, not user-info
    ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    ("runs:/0123/pruned_model", "runs:/0123/pruned_model"),
    ("mail me@example.com", "mail me@example.com"),
    ("", ""),
])
def test_redact_urls_and_queries(text, expected):
    assert redact(text) == expected


def test_secret_environment_values_are_masked_and_ordinary_ones_are_not(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Hunter2Secret")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghij")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "AKIAxyzxyzxyz")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsefalse")   # 'TOKENIZERS' is not 'TOKEN'
    monkeypatch.setenv("MY_PASSWORD", "abc")                      # too short to mask safely
    text = "pw Hunter2Secret hf hf_abcdefghij aws AKIAxyzxyzxyz tok falsefalse short abc"
    assert redact(text) == f"pw {MASK} hf {MASK} aws {MASK} tok falsefalse short abc"


def test_log_filter_redacts_formatted_records_and_tracebacks(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Hunter2Secret")
    record = logging.LogRecord("mlflow", logging.WARNING, __file__, 1,
                               "request to %s failed (%s)", ("http://a:b@h:1/api", "Hunter2Secret"), None)
    try:
        raise RuntimeError("boom at http://a:b@h:1/x")
    except RuntimeError:
        import sys
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"request to http://***@h:1/api failed ({MASK})"
    assert "http://***@h:1/x" in record.exc_text and "a:b@" not in record.exc_text


def test_install_log_filter_is_idempotent_and_covers_handlers():
    logger = logging.getLogger("mlflow")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        install_log_filter()
        install_log_filter()
        assert sum(isinstance(f, RedactingFilter) for f in logger.filters) == 1
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)

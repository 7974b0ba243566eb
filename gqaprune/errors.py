"""The toolkit's one exception type for bad input.

Every message is a single line that names the problem and the fix; entry points print it
without a traceback, exit non-zero and mark the MLflow run FAILED with it.
"""


class UserError(Exception):
    """Bad input the user can fix (unknown name, bad ratio, missing file, offline hub ...)."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))  # always one line

"""Names of the robustness layer (issues 12 and 15): liveness tags, reasons, environment knobs.

Kept apart from ``schema.py`` while the lead refactors it; to be folded into ``schema``.
"""

# ---- liveness: who owns a RUNNING run, and is that process still there -----------------------
TAG_HOST = "liveness/host"            # socket.gethostname() of the process that runs the run
TAG_PID = "liveness/pid"              # its PID
TAG_PID_START = "liveness/pid_start"  # its start time (/proc/<pid>/stat field 22, clock ticks after
                                      # boot): a reused PID has another start time
TAG_MACHINE = "liveness/machine"      # "<boot id>:<pid namespace>": where PID + start are meaningful
TAG_HEARTBEAT = "liveness/heartbeat"  # unix seconds of the last heartbeat (a daemon thread)
TAG_CLOSED_BY = "liveness/closed_by"  # on a run closed for its dead process: who closed it and why

# ---- reasons (values of schema.TAG_FAILURE) --------------------------------------------------
REASON_KILLED = "killed"                     # the process died without closing (SIGKILL, OOM, node)
REASON_SIGNAL = "killed by {signal}"         # KILLED by SIGTERM / SIGINT / SIGHUP
REASON_INTERRUPTED = "interrupted by the user"  # a KeyboardInterrupt raised without a signal

# ---- one experiment whichever launcher --------------------------------------------------------
MLFLOW_DEFAULT_EXPERIMENT_ID = "0"    # MLflow's "Default": never where our runs land by default
TAG_LAUNCHER_RUN = "launcher_run_id"  # on a run started under `mlflow run` in Default: the launcher's run
TAG_MOVED_TO = "moved_to_run_id"      # on that launcher run: the run that holds the results
TAG_MOVED_TO_EXPERIMENT = "moved_to_experiment"
TAG_NOTE = "mlflow.note.content"      # the run description shown by the MLflow UI

# ---- environment knobs -------------------------------------------------------------------------
ENV_HEARTBEAT_S = "GQAPRUNE_HEARTBEAT_S"        # heartbeat period (default 30 s)
ENV_STALE_AFTER_S = "GQAPRUNE_STALE_AFTER_S"    # a run on another machine is dead after this long
                                                # without a heartbeat (default 300 s)
ENV_STORE_RETRY_S = "GQAPRUNE_STORE_RETRY_S"    # how long a store write is retried before its data
                                                # is spooled (default 60 s SQLite, 300 s server)
ENV_SPOOL = "GQAPRUNE_SPOOL"                    # spool dir (default <GQAPRUNE_CACHE>/spool)

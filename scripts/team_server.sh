#!/usr/bin/env bash
# Team tracking server: PostgreSQL as MLflow's backend store + `mlflow server` with basic-auth and
# artifact proxying, on loopback unless told otherwise. Every process it starts can be stopped.
#
#   scripts/team_server.sh start  [--dir DIR] [--port 5000] [--pg-port 5433] [--pg-data DIR]
#                                 [--host ADDR] [--allowed-hosts H1,H2] [--workers 2]
#                                 [--credentials FILE] [--default-permission READ] [--throwaway]
#                                 [--only mlflow]   # (re)start only the MLflow server
#   scripts/team_server.sh status [--dir DIR]
#   scripts/team_server.sh stop   [--dir DIR] [--only mlflow] [--purge]
#   scripts/team_server.sh env    [--dir DIR]        # prints the client's `export ...` lines (no secret)
#   scripts/team_server.sh add-user NAME [--dir DIR] [--grant EXPERIMENT=PERMISSION]...
#   scripts/team_server.sh grant NAME EXPERIMENT PERMISSION [--dir DIR]
#
# What `start` does (idempotent: it starts only what is not running, so after a crash of the
# MLflow server a second `start` brings it back on the same database):
#   1. A PostgreSQL 15 cluster in --pg-data (default DIR/pgdata; `initdb` on first use). initdb and
#      postgres refuse to run as root, so as root they run as the OS user $PG_OS_USER (default
#      `postgres`, through runuser); that user must be able to reach --pg-data. PostgreSQL listens on
#      127.0.0.1:--pg-port only (and a socket inside its data dir), whatever --host says. Database
#      role `mlflow` gets a random password kept in DIR/pgpass (mode 600, libpq's PGPASSFILE), so
#      no password appears in a URI, a command line or a log. Databases: `mlflow` (runs) and
#      `mlflow_auth` (users and permissions of the basic-auth app).
#   2. `mlflow server --app-name basic-auth --backend-store-uri postgresql+psycopg2://...
#      --serve-artifacts --artifacts-destination DIR/artifacts --host 127.0.0.1 --port PORT`
#      in its own process group (pid in DIR/mlflow.pid; log DIR/mlflow.log). Clients upload and
#      download artifacts through the server (mlflow-artifacts:/), so workers need no shared disk.
#      MLflow's GenAI job runner is off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns it on);
#      checked passwords are cached 60 s per server worker (GQAPRUNE_AUTH_CACHE_TTL; 0 = off,
#      which costs a PBKDF2 hash per request: measured 0.44 s vs 0.02 s per request here).
#      --host with a non-loopback address binds there and prints a warning: anyone who can reach
#      the port can then try passwords; put TLS (a reverse proxy) in front and set --allowed-hosts.
#   3. Authentication (MLflow's basic-auth app; config DIR/basic_auth.ini, mode 600): the admin
#      user is created on the first start from, in this order, --credentials FILE (MLflow's own
#      credentials-file format, see below; must be mode 600 or 400), the environment variables
#      MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or else a generated password written
#      to DIR/credentials (mode 600). Credentials are never put in code, a URI, a command line, a
#      log, or an MLflow param/tag. A request without credentials gets 401. Every authenticated
#      user may read (default_permission READ, --default-permission to change it) but creating runs
#      in an experiment needs EDIT on it: `add-user alice --grant gqaprune=EDIT` (password read
#      from the first line of stdin or $GQAPRUNE_NEW_PASSWORD). A user created without grants is
#      a read-only user. Once the admin exists, later --credentials / env values are ignored by
#      MLflow (change the password through its update-password API).
#
# Credentials file format (the same as ~/.mlflow/credentials, which MLflow clients read):
#   [mlflow]
#   mlflow_tracking_username = admin
#   mlflow_tracking_password = ...
#
# Clients (entry points, analysis, Ray workers) need no code change:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#   export MLFLOW_TRACKING_USERNAME=alice MLFLOW_TRACKING_PASSWORD=...   # or ~/.mlflow/credentials
#
# --throwaway marks DIR for deletion: `stop` then removes DIR and --pg-data (a test cluster);
# `stop --purge` does so for any DIR. Without it the data persists across stop/start.
# Environment: GQAPRUNE_PYTHON (python that has mlflow + psycopg2; default .venv/bin/python, then
# python3), PG_BIN (default /usr/lib/postgresql/15/bin), PG_OS_USER (default postgres).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_OS_USER="${PG_OS_USER:-postgres}"
DIR="${GQAPRUNE_TEAM_DIR:-$ROOT/.team_server}"
# Empty = not given on the command line: the value saved by the first `start`, else the default.
PORT="" PG_PORT="" PG_DATA="" HOST="" ALLOWED_HOSTS="" WORKERS="" CREDS_FILE=""
DEFAULT_PERMISSION="" THROWAWAY=0 ONLY="" PURGE=0 GRANTS=() ADMIN_CREDS=""
SAVED=(PORT PG_PORT PG_DATA HOST ALLOWED_HOSTS WORKERS DEFAULT_PERMISSION)

die() { echo "team_server: error: $1${2:+ ($2)}" >&2; exit 2; }
say() { echo "team_server: $*" >&2; }

python_bin() {
  if [ -n "${GQAPRUNE_PYTHON:-}" ]; then echo "$GQAPRUNE_PYTHON"
  elif [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"
  else command -v python3 || die "no python found" "set GQAPRUNE_PYTHON"; fi
}

parse_flags() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --dir) DIR="$2"; shift 2 ;;
      --port) PORT="$2"; shift 2 ;;
      --pg-port) PG_PORT="$2"; shift 2 ;;
      --pg-data) PG_DATA="$2"; shift 2 ;;
      --host) HOST="$2"; shift 2 ;;
      --allowed-hosts) ALLOWED_HOSTS="$2"; shift 2 ;;
      --workers) WORKERS="$2"; shift 2 ;;
      --credentials) CREDS_FILE="$2"; shift 2 ;;
      --default-permission) DEFAULT_PERMISSION="$2"; shift 2 ;;
      --throwaway) THROWAWAY=1; shift ;;
      --only) ONLY="$2"; shift 2 ;;
      --purge) PURGE=1; shift ;;
      --grant) GRANTS+=("$2"); shift 2 ;;
      *) die "unknown flag '$1'" "see the header of $0" ;;
    esac
  done
  case "$PORT$PG_PORT$WORKERS" in *[!0-9]*) die "ports and --workers must be numbers" ;; esac
  case "${DEFAULT_PERMISSION:-READ}" in READ|EDIT|MANAGE|NO_PERMISSIONS) ;;
    *) die "--default-permission '$DEFAULT_PERMISSION'" "use READ, EDIT, MANAGE or NO_PERMISSIONS" ;; esac
}

# ---------------------------------------------------------------------------- saved state
# DIR/server.env keeps the settings of the last `start` (no secret): a flag not given now keeps
# its saved value, so status/stop/env and a restart need only --dir.
load_state() {
  local name saved
  for name in "${SAVED[@]}"; do
    saved=""
    [ -f "$DIR/server.env" ] && saved="$(sed -n "s/^$name=//p" "$DIR/server.env")"
    if [ -n "$saved" ] && [ -n "${!name}" ] && [ "$saved" != "${!name}" ]; then
      case "$name" in  # the cluster's data dir and port are fixed at its first start
        PG_DATA|PG_PORT) die "$DIR belongs to the cluster with $name=$saved" "drop that flag or use another --dir" ;;
      esac
    fi
    [ -z "${!name}" ] && printf -v "$name" '%s' "$saved"   # not given now: the saved value
  done
  PG_DATA="${PG_DATA:-$DIR/pgdata}" PG_PORT="${PG_PORT:-5433}" PORT="${PORT:-5000}"
  HOST="${HOST:-127.0.0.1}" WORKERS="${WORKERS:-2}" DEFAULT_PERMISSION="${DEFAULT_PERMISSION:-READ}"
  [ -f "$DIR/throwaway" ] && THROWAWAY=1 || true
}

save_state() {  # the non-secret settings, so later commands need only --dir
  local name
  (umask 077; for name in "${SAVED[@]}"; do printf '%s=%s\n' "$name" "${!name}"; done >"$DIR/server.env")
}

is_root() { [ "$(id -u)" = 0 ]; }
as_pg() { if is_root; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi; }
pg_running() { [ -f "$PG_DATA/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }
mlflow_pid() { [ -f "$DIR/mlflow.pid" ] && cat "$DIR/mlflow.pid" || true; }
alive() {  # pid exists and is not a zombie (a killed server whose parent has not reaped it)
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
  local st; st="$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)"
  [ "$st" != Z ] && [ "$st" != X ]
}
mlflow_running() { alive "$(mlflow_pid)"; }
url() { local h="$HOST"; case "$h" in 0.0.0.0|::) h=127.0.0.1 ;; esac; echo "http://$h:$PORT"; }
random_secret() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

# ---------------------------------------------------------------------------- PostgreSQL
psql_admin() {  # SQL on stdin, as the cluster's superuser over the socket in the data dir (peer auth)
  as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DATA" -p "$PG_PORT" -d postgres "$@"
}

init_cluster() {
  mkdir -p "$PG_DATA"
  if is_root; then
    id "$PG_OS_USER" >/dev/null 2>&1 || die "OS user '$PG_OS_USER' does not exist" "create it or set PG_OS_USER"
    chown "$PG_OS_USER" "$PG_DATA"
    chmod 700 "$PG_DATA"
    runuser -u "$PG_OS_USER" -- test -w "$PG_DATA" \
      || die "user '$PG_OS_USER' cannot reach $PG_DATA" "pass --pg-data in a directory it can traverse (e.g. under /var/tmp)"
  fi
  say "initdb $PG_DATA"
  as_pg "$PG_BIN/initdb" -D "$PG_DATA" --encoding=UTF8 --locale=C --auth-local=peer \
    --auth-host=scram-sha-256 >"$DIR/initdb.log" 2>&1 || die "initdb failed" "see $DIR/initdb.log"
  local extra=""
  if [ "$THROWAWAY" = 1 ]; then  # a test cluster: durability buys nothing
    extra=$'fsync = off\nsynchronous_commit = off\nfull_page_writes = off'
  fi
  as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
max_connections = 200
$extra
EOF
}

start_postgres() {
  if pg_running; then say "postgres already running ($PG_DATA)"; return; fi
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL binaries not found in $PG_BIN" "apt-get install postgresql, or set PG_BIN"
  local fresh=0
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then init_cluster; fresh=1; fi
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/postgres.log" -w -t 60 start >/dev/null \
    || die "postgres did not start" "see $PG_DATA/postgres.log"
  say "postgres listening on 127.0.0.1:$PG_PORT"
  if [ "$fresh" = 1 ]; then
    local pw; pw="$(random_secret)"
    # The password goes through stdin (printf is a builtin): it never shows in `ps`.
    printf "CREATE ROLE mlflow LOGIN PASSWORD '%s';\nCREATE DATABASE mlflow OWNER mlflow;\nCREATE DATABASE mlflow_auth OWNER mlflow;\n" "$pw" | psql_admin
    (umask 077; printf '127.0.0.1:%s:*:mlflow:%s\n' "$PG_PORT" "$pw" >"$DIR/pgpass")
  fi
}

stop_postgres() {
  if pg_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null && say "postgres stopped"
  fi
}

# ---------------------------------------------------------------------------- credentials
# Prints "username<newline>password" of the admin on stdout (to be read by `read`, never echoed).
admin_credentials() {
  local py; py="$(python_bin)"
  if [ -n "$CREDS_FILE" ]; then
    [ -f "$CREDS_FILE" ] || die "credentials file '$CREDS_FILE' not found"
    case "$(stat -c %a "$CREDS_FILE")" in 600|400) ;;
      *) die "credentials file '$CREDS_FILE' is readable by others" "chmod 600 $CREDS_FILE" ;; esac
    "$py" - "$CREDS_FILE" <<'EOF'
import configparser, sys
c = configparser.ConfigParser(); c.read(sys.argv[1])
s = c["mlflow"] if "mlflow" in c else {}
user, pw = s.get("mlflow_tracking_username", ""), s.get("mlflow_tracking_password", "")
if not user or not pw:
    sys.exit("credentials file needs [mlflow] mlflow_tracking_username and mlflow_tracking_password")
print(user); print(pw)
EOF
  elif [ -n "${MLFLOW_TRACKING_USERNAME:-}" ] && [ -n "${MLFLOW_TRACKING_PASSWORD:-}" ]; then
    printf '%s\n%s\n' "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD"
  elif [ -f "$DIR/credentials" ]; then
    CREDS_FILE="$DIR/credentials" admin_credentials
  else
    local pw; pw="$(random_secret)"
    (umask 077; printf '[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = %s\n' "$pw" >"$DIR/credentials")
    say "generated admin credentials in $DIR/credentials (mode 600)"
    printf 'admin\n%s\n' "$pw"
  fi
}

write_auth_ini() {
  (umask 077; cat >"$DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = $DEFAULT_PERMISSION
database_uri = postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# A checked password is cached for a minute (per server worker): without it every request pays
# a PBKDF2 hash, which made a sweep's many small requests CPU-bound. A changed or deleted
# password takes effect at once on the worker that changed it, within the TTL on the others.
auth_cache_ttl_seconds = ${GQAPRUNE_AUTH_CACHE_TTL:-60}
EOF
  )
}

# ---------------------------------------------------------------------------- MLflow server
wait_healthy() {
  local py; py="$(python_bin)"
  "$py" - "$(url)/health" "$(mlflow_pid)" <<'EOF' || die "mlflow server did not become healthy" "see $DIR/mlflow.log"
import os, sys, time, urllib.request
deadline = time.time() + 120
while time.time() < deadline:
    try:
        state = open(f"/proc/{sys.argv[2]}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "X"
    if state in ("Z", "X"):
        sys.exit(1)            # the server died while starting
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

start_mlflow() {
  if mlflow_running; then say "mlflow server already running (pid $(mlflow_pid)) at $(url)"; return; fi
  case "$HOST" in
    127.*|localhost|::1) ;;
    *) say "WARNING: binding the tracking server to $HOST, not loopback: anyone who can reach" \
           "port $PORT can try passwords. Put TLS in front and set --allowed-hosts." ;;
  esac
  local py user pw extra=()
  py="$(python_bin)"
  "$py" -c "import psycopg2, mlflow.server.auth" 2>/dev/null \
    || die "$py lacks psycopg2 or mlflow" "pip install -e '.[distributed]'"
  user="${ADMIN_CREDS%%$'\n'*}" pw="${ADMIN_CREDS#*$'\n'}"
  [ -n "$user" ] && [ -n "$pw" ] || die "no admin credentials"
  write_auth_ini
  if [ ! -s "$DIR/flask_secret" ]; then  # CSRF key of the auth app, stable across restarts
    (umask 077; random_secret >"$DIR/flask_secret")
  fi
  mkdir -p "$DIR/artifacts"
  [ -n "$ALLOWED_HOSTS" ] && extra+=(--allowed-hosts "$ALLOWED_HOSTS")
  # The admin credentials reach the server only through its environment (readable by its own user).
  # MLflow's GenAI job runner (8 huey processes) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true.
  MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini" PGPASSFILE="$DIR/pgpass" \
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$DIR/flask_secret")" \
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
  MLFLOW_AUTH_ADMIN_USERNAME="$user" MLFLOW_AUTH_ADMIN_PASSWORD="$pw" \
  MLFLOW_TRACKING_USERNAME="" MLFLOW_TRACKING_PASSWORD="" \
    setsid "$py" -m mlflow server --app-name basic-auth \
      --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow" \
      --serve-artifacts --artifacts-destination "$DIR/artifacts" \
      --host "$HOST" --port "$PORT" --workers "$WORKERS" "${extra[@]}" \
      >>"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$DIR/mlflow.pid"
  wait_healthy
  say "mlflow server (pid $(mlflow_pid), basic-auth) at $(url); artifacts in $DIR/artifacts"
}

stop_mlflow() {
  local p; p="$(mlflow_pid)"
  if alive "$p"; then
    kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do alive "$p" || break; sleep 0.25; done
    kill -KILL -- "-$p" 2>/dev/null || true
    say "mlflow server stopped"
  fi
  # Its workers share the process group; make sure none outlives the leader.
  [ -n "$p" ] && kill -KILL -- "-$p" 2>/dev/null || true
  rm -f "$DIR/mlflow.pid"
}

# ---------------------------------------------------------------------------- users (REST, as admin)
admin_rest() {  # admin_rest NAME PASSWORD_OR_EMPTY GRANT... ; admin credentials on fd 3
  local py; py="$(python_bin)"
  "$py" - "$(url)" "$@" 3< <(admin_credentials) <<'EOF'
import base64, json, os, sys, urllib.error, urllib.parse, urllib.request
base, name, password, grants = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
with os.fdopen(3) as f:
    admin, admin_pw = f.readline().strip(), f.readline().strip()
auth = "Basic " + base64.b64encode(f"{admin}:{admin_pw}".encode()).decode()

def call(method, path, body=None, params=None):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, method=method, headers={"Authorization": auth,
                                 "Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")[:300]
        if e.code == 404 and path.endswith("get-by-name"):
            return None
        sys.exit(f"team_server: error: {method} {path} -> HTTP {e.code}: {text}")

if password:
    call("POST", "/api/2.0/mlflow/users/create", {"username": name, "password": password})
    print(f"team_server: user '{name}' created", file=sys.stderr)
for grant in grants:
    exp, _, perm = grant.partition("=")
    if perm not in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS"):
        sys.exit(f"team_server: error: grant '{grant}': use EXPERIMENT=READ|EDIT|MANAGE|NO_PERMISSIONS")
    got = call("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": exp})
    exp_id = got["experiment"]["experiment_id"] if got else \
        call("POST", "/api/2.0/mlflow/experiments/create", {"name": exp})["experiment_id"]
    call("POST", "/api/3.0/mlflow/users/permissions/grant",
         {"username": name, "resource_type": "experiment", "resource_id": exp_id, "permission": perm})
    print(f"team_server: '{name}' has {perm} on experiment '{exp}' ({exp_id})", file=sys.stderr)
EOF
}

# ---------------------------------------------------------------------------- commands
cmd_start() {
  mkdir -p "$DIR"
  chmod 711 "$DIR"   # traversable by the postgres user (DIR/pgdata); secrets inside are mode 600
  [ "$THROWAWAY" = 1 ] && : >"$DIR/throwaway"
  load_state
  ADMIN_CREDS="$(admin_credentials)" || exit 2   # checked before anything starts
  save_state
  [ "$ONLY" = mlflow ] || start_postgres
  pg_running || die "postgres is not running" "run start without --only"
  start_mlflow
  echo "export MLFLOW_TRACKING_URI=$(url)"
}

cmd_stop() {
  load_state
  stop_mlflow
  [ "$ONLY" = mlflow ] && return
  stop_postgres
  if [ "$PURGE" = 1 ] || [ -f "$DIR/throwaway" ]; then
    rm -rf "$PG_DATA" "$DIR"
    say "removed $DIR and $PG_DATA"
  fi
}

cmd_status() {
  load_state
  local rc=0
  if pg_running; then echo "postgres: running on 127.0.0.1:$PG_PORT ($PG_DATA)"; else echo "postgres: stopped"; rc=1; fi
  if mlflow_running; then echo "mlflow:   running (pid $(mlflow_pid)) at $(url)"; else echo "mlflow:   stopped"; rc=1; fi
  return $rc
}

main() {
  [ $# -ge 1 ] || die "no command" "use start, status, stop, env, add-user or grant"
  local cmd="$1"; shift
  case "$cmd" in
    start) parse_flags "$@"; cmd_start ;;
    stop) parse_flags "$@"; cmd_stop ;;
    status) parse_flags "$@"; cmd_status ;;
    env) parse_flags "$@"; load_state; echo "export MLFLOW_TRACKING_URI=$(url)"
         echo "# and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)" ;;
    add-user)
      [ $# -ge 1 ] || die "add-user needs a NAME"
      local name="$1" pw; shift; parse_flags "$@"; load_state
      pw="${GQAPRUNE_NEW_PASSWORD:-}"
      [ -n "$pw" ] || IFS= read -r pw || true
      [ -n "$pw" ] || die "no password for '$name'" "pipe it on stdin or set GQAPRUNE_NEW_PASSWORD"
      admin_rest "$name" "$pw" "${GRANTS[@]}" ;;
    grant)
      [ $# -ge 3 ] || die "grant needs NAME EXPERIMENT PERMISSION"
      local name="$1" exp="$2" perm="$3"; shift 3; parse_flags "$@"; load_state
      admin_rest "$name" "" "$exp=$perm" ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd'" "use start, status, stop, env, add-user or grant" ;;
  esac
}

main "$@"

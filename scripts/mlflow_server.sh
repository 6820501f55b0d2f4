#!/usr/bin/env bash
# A team tracking server: `mlflow server` on a PostgreSQL backend store, artifacts in a local
# directory served through the server (clients need no shared filesystem), all on loopback.
#
#   scripts/mlflow_server.sh          # start PostgreSQL (initialised on first use) and the server; Ctrl-C stops both
#   scripts/mlflow_server.sh stop     # stop a PostgreSQL left running
#
# Settings (environment):
#   MLFLOW_SERVER_DIR  state directory (default .mlflow-server): artifacts/, postgres.log
#   PGDATA             the cluster's data directory (default $MLFLOW_SERVER_DIR/pgdata)
#   PG_PORT            PostgreSQL port on 127.0.0.1 (default 5433: leaves a system cluster's 5432 alone)
#   MLFLOW_PORT        tracking server port on 127.0.0.1 (default 5000)
#   MLFLOW_WORKERS     server worker processes (default 2: a two-core machine)
# Databases: `mlflow` (runs and registry) and `optuna` (shared studies), owned by role `mlflow` (not a
# superuser; it can create nothing else). Password authentication (scram-sha-256) for every connection,
# local ones included; listen_addresses = 127.0.0.1. On first use the script generates the passwords:
#   $MLFLOW_SERVER_DIR/postgres-admin.password  the cluster's superuser `postgres_admin` (0600)
#   $MLFLOW_SERVER_DIR/pgpass                   libpq password file for role `mlflow` (0600): clients
#                                               `export PGPASSFILE=$MLFLOW_SERVER_DIR/pgpass` and keep the
#                                               password out of URLs (and so out of logged parameters)
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=$(mkdir -p "${MLFLOW_SERVER_DIR:-.mlflow-server}" && cd "${MLFLOW_SERVER_DIR:-.mlflow-server}" && pwd)
PGDATA=${PGDATA:-$STATE_DIR/pgdata}
PG_PORT=${PG_PORT:-5433}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
DB_USER=mlflow
ADMIN_USER=postgres_admin
ADMIN_PASSWORD_FILE=$STATE_DIR/postgres-admin.password
PGPASS_FILE=$STATE_DIR/pgpass

# Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin.
pg_bin() {
    if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return; fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$found" ]; then
        echo "error: PostgreSQL's $1 not found (Debian/Ubuntu: apt-get install postgresql)" >&2
        exit 1
    fi
    echo "$found"
}
INITDB=$(pg_bin initdb)
PG_CTL=$(pg_bin pg_ctl)
PSQL=$(pg_bin psql)

# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u "${PG_OS_USER:-postgres}" -- "$@"; else "$@"; fi
}

stop_postgres() {
    if [ -f "$PGDATA/postmaster.pid" ]; then
        as_pg "$PG_CTL" -D "$PGDATA" -m fast -w stop >/dev/null || true
    fi
}

if [ "${1:-}" = "stop" ]; then
    stop_postgres
    exit 0
fi

mkdir -p "$PGDATA" "$STATE_DIR/artifacts"
if [ "$(id -u)" = 0 ]; then
    chown "${PG_OS_USER:-postgres}" "$PGDATA"
    if ! as_pg test -w "$PGDATA"; then
        echo "error: PGDATA=$PGDATA is not reachable by user ${PG_OS_USER:-postgres} (as root the cluster runs as that user): set PGDATA to a directory it can reach" >&2
        exit 1
    fi
fi
chmod 700 "$PGDATA"
new_password() { "${PYTHON:-python3}" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
if [ ! -f "$PGDATA/PG_VERSION" ]; then
    echo "mlflow_server: initialising a PostgreSQL cluster in $PGDATA (password authentication)"
    (umask 077; new_password > "$ADMIN_PASSWORD_FILE"; printf '127.0.0.1:*:*:%s:%s\n' "$DB_USER" "$(new_password)" > "$PGPASS_FILE")
    # initdb runs as the cluster's user, which may not reach STATE_DIR: hand it a private copy.
    pwfile=$(mktemp)
    cp "$ADMIN_PASSWORD_FILE" "$pwfile"
    [ "$(id -u)" = 0 ] && chown "${PG_OS_USER:-postgres}" "$pwfile"
    as_pg "$INITDB" -D "$PGDATA" -U "$ADMIN_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 --no-locale >/dev/null
    rm -f "$pwfile"
elif [ ! -f "$ADMIN_PASSWORD_FILE" ] || [ ! -f "$PGPASS_FILE" ]; then
    echo "error: the cluster in $PGDATA has no password files in $STATE_DIR (made by an older, trust-authenticated version of this script): move it away to start a new one" >&2
    exit 1
fi
# Socket and log inside the data directory: nothing outside it needs to be writable by the cluster's user.
as_pg "$PG_CTL" -D "$PGDATA" -l "$PGDATA/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PGDATA" start >/dev/null
trap stop_postgres EXIT
admin_sql() { PGPASSWORD=$(cat "$ADMIN_PASSWORD_FILE") "$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U "$ADMIN_USER" -d postgres -v ON_ERROR_STOP=1 "$@"; }
if [ "$(admin_sql -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != 1 ]; then
    password=$(cut -d: -f5- "$PGPASS_FILE")
    admin_sql -qc "CREATE ROLE $DB_USER LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$password'" >/dev/null
fi
for db in mlflow optuna; do
    exists=$(admin_sql -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")
    [ "$exists" = 1 ] || admin_sql -qc "CREATE DATABASE $db OWNER $DB_USER" >/dev/null
done

# The server and its clients read the role's password from the pgpass file (never from a URL).
export PGPASSFILE=$PGPASS_FILE
BACKEND="postgresql+psycopg2://$DB_USER@127.0.0.1:$PG_PORT/mlflow"
echo "mlflow_server: backend store $BACKEND (password in $PGPASS_FILE), artifacts $STATE_DIR/artifacts"
echo "mlflow_server: export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
echo "mlflow_server: Optuna storage for tune: export PGPASSFILE=$PGPASS_FILE; -P storage=postgresql+psycopg2://$DB_USER@127.0.0.1:$PG_PORT/optuna"
MLFLOW_BIN=mlflow
[ -x .venv/bin/mlflow ] && MLFLOW_BIN=.venv/bin/mlflow
# Its own process group (setsid), so stopping reaches the uvicorn workers it spawns; not exec, so
# the EXIT trap still stops PostgreSQL when the server ends.
setsid "$MLFLOW_BIN" server --backend-store-uri "$BACKEND" --artifacts-destination "$STATE_DIR/artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" &
server_pid=$!
stop_all() {
    kill -TERM -- "-$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    stop_postgres
}
trap stop_all EXIT
trap 'exit 0' INT TERM
wait "$server_pid" || true

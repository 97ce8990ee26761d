#!/usr/bin/env bash
# A throw-away PostgreSQL cluster on a loopback port, for the test that runs two sweep
# processes against one Optuna study (tests/test_sweep_postgres.py).
#
# Sourced by .ci/run:
#     source .ci/postgres.sh
#     pg_start          # exports CONVTRAIN_TEST_POSTGRES_URL, or warns and leaves it unset
#     trap pg_stop EXIT
# or as a command:  eval "$(bash .ci/postgres.sh start)"  ...  bash .ci/postgres.sh stop
#
# Installs Debian's postgresql package when no server binaries are found (CI runs as root
# on a fresh machine). initdb and postgres refuse to run as root, so as root the cluster
# runs as an unprivileged user (nobody). Nothing here may fail CI: when PostgreSQL cannot be
# had, it says why on stderr and the test skips.

PG_STATE_FILE="/tmp/convtrain-ci-postgres.dir"

_pg_warn() { echo "postgres.sh: $*; the PostgreSQL sweep test will be skipped" >&2; }

# The directory holding initdb/pg_ctl/postgres: PATH first, then the newest Debian version.
_pg_bindir() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

_pg_install() {
    [ "$(id -u)" = 0 ] || return 1
    command -v apt-get >/dev/null 2>&1 || return 1
    echo "postgres.sh: installing PostgreSQL from the distribution's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || return 1
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || return 1
}

# Run a command as the cluster's owner: as root, the unprivileged user; otherwise ourselves.
_pg_as_owner() {
    if [ "$(id -u)" != 0 ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u nobody -- "$@"
    else
        setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"
    fi
}

_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_pg_try_start() {
    local bindir datadir port
    bindir=$(_pg_bindir) || true
    if [ -z "$bindir" ]; then
        _pg_install || { _pg_warn "PostgreSQL is not installed and could not be installed"; return 1; }
        bindir=$(_pg_bindir) || true
        [ -n "$bindir" ] || { _pg_warn "no initdb found after installing PostgreSQL"; return 1; }
    fi
    # in /tmp, not $TMPDIR: the unprivileged owner must be able to reach it
    datadir=$(mktemp -d /tmp/convtrain-pg.XXXXXX) || { _pg_warn "cannot make a data folder"; return 1; }
    echo "$datadir" >"$PG_STATE_FILE"
    if [ "$(id -u)" = 0 ]; then
        chown nobody "$datadir" || { _pg_warn "cannot hand $datadir to user nobody"; return 1; }
    fi
    port=$(_pg_free_port) || { _pg_warn "cannot find a free port"; return 1; }
    # trust on loopback only: a throw-away cluster for one CI run, never reachable from outside
    _pg_as_owner "$bindir/initdb" -D "$datadir/data" -U convtrain -A trust -E UTF8 --no-sync \
        >"$datadir/initdb.log" 2>&1 || { _pg_warn "initdb failed: $(tail -n 1 "$datadir/initdb.log")"; return 1; }
    _pg_as_owner "$bindir/pg_ctl" -D "$datadir/data" -l "$datadir/data/server.log" -w -t 60 \
        -o "-p $port -k $datadir/data -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50" \
        start >/dev/null 2>&1 || { _pg_warn "the server did not start: $(tail -n 1 "$datadir/data/server.log" 2>/dev/null)"; return 1; }
    _pg_as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U convtrain convtrain_test >/dev/null 2>&1 \
        || { _pg_warn "createdb failed"; return 1; }
    export CONVTRAIN_TEST_POSTGRES_URL="postgresql://convtrain@127.0.0.1:$port/convtrain_test"
    echo "postgres.sh: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $datadir)" >&2
}

pg_start() {
    unset CONVTRAIN_TEST_POSTGRES_URL
    if ! _pg_try_start; then
        unset CONVTRAIN_TEST_POSTGRES_URL
        pg_stop
    fi
    return 0
}

pg_stop() {
    local datadir bindir
    datadir=$(cat "$PG_STATE_FILE" 2>/dev/null) || return 0
    bindir=$(_pg_bindir) || true
    if [ -n "$bindir" ] && [ -f "$datadir/data/postmaster.pid" ]; then
        _pg_as_owner "$bindir/pg_ctl" -D "$datadir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    case "$datadir" in
        /tmp/convtrain-pg.*) rm -rf "$datadir" ;;
    esac
    rm -f "$PG_STATE_FILE"
    return 0
}

# As a command rather than sourced.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
        start)
            pg_start
            [ -n "${CONVTRAIN_TEST_POSTGRES_URL:-}" ] && echo "export CONVTRAIN_TEST_POSTGRES_URL=$CONVTRAIN_TEST_POSTGRES_URL"
            exit 0 ;;
        stop) pg_stop ;;
        *) echo "usage: $0 start|stop" >&2; exit 2 ;;
    esac
fi

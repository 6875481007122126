#!/usr/bin/env bash
# Start PostgreSQL and Redis where they are not running (installing them from Debian's packages where
# they are missing), create the test database, and install SIPp and Redis Sentinel. Idempotent; used by `make test`.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
TEST_DB=${TEST_DB:-optout_test}

have() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if [ "$(id -u)" = 0 ] && have apt-get; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "services: please install $* (need root and apt-get)" >&2; exit 1
  fi
}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }
if ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "services: installing PostgreSQL" >&2
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -Eq '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    echo "host all all 127.0.0.1/32 trust" >> "$hba"
  fi
  echo "services: starting PostgreSQL $version" >&2
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
  pg_up || { echo "services: PostgreSQL did not start" >&2; exit 1; }
fi
psql_admin() { psql -h "$PGHOST" -p "$PGPORT" -U postgres -d postgres -qtA "$@"; }
if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$TEST_DB'")" ]; then
  psql_admin -c "CREATE DATABASE $TEST_DB" >/dev/null
fi

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if ! redis_up; then
  have redis-server || { echo "services: installing Redis" >&2; apt_install redis-server; }
  echo "services: starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/optout.log
  for _ in $(seq 1 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "services: Redis did not start" >&2; exit 1; }
fi
# A real SIP user agent for the tests that play the called party (Debian's package is sip-tester).
if ! have sipp || [ ! -f /usr/share/sip-tester/dtmf_2833_9.pcap ]; then
  echo "services: installing SIPp (sip-tester)" >&2
  apt_install sip-tester
fi
# Redis Sentinel for the failover tests (Debian's package; the tests run their own sentinels on spare ports).
if ! have redis-sentinel; then
  echo "services: installing Redis Sentinel" >&2
  apt_install redis-sentinel
  # The package starts a system sentinel on 26379; the tests do not use it.
  pkill -f 'redis-sentinel.*:26379' 2>/dev/null || true
fi
echo "services: PostgreSQL, Redis, Redis Sentinel and SIPp are ready" >&2

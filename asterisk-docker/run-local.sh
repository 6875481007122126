#!/usr/bin/env bash
# `make run`: the agent on embedded defaults. Secrets are generated once into .run/secrets.env (mode 600)
# unless the environment already sets them; the Asterisk sandbox is started where it can be (root on a
# Debian-like machine); then the agent runs in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run
secrets=.run/secrets.env
if [ ! -f "$secrets" ]; then
  umask 077
  {
    echo "ARI_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
    echo "AMI_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
    echo "AGENT_API_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
  } > "$secrets"
  echo "run: generated credentials in $secrets" >&2
fi
set -a
# shellcheck disable=SC1090
. "$secrets"
set +a
export ARI_PASSWORD="${ARI_PASSWORD}" AMI_SECRET="${AMI_SECRET}" AGENT_API_TOKEN="${AGENT_API_TOKEN}"
export AMI_HOST="${AMI_HOST:-127.0.0.1}" AMI_USERNAME="${AMI_USERNAME:-optout}"
export OPTOUT_DB_PATH="${OPTOUT_DB_PATH:-.run/optout.db}" OPTOUT_JOURNAL_PATH="${OPTOUT_JOURNAL_PATH:-.run/optout-journal.db}"

if [ -z "${ASTERISK_EXTERNAL:-}" ] && [ -x asterisk-docker/sandbox ]; then
  if [ "$(id -u)" = 0 ]; then
    asterisk-docker/sandbox up
  else
    echo "run: not root, so the Asterisk sandbox is not started; point ARI_URL at your Asterisk" >&2
  fi
fi
exec .venv/bin/python -m agent

#!/usr/bin/env bash
# `make run`: the agent on embedded defaults. The sandbox credentials are generated once into .run/secrets.env
# (mode 600, shared with `make test`) unless the environment already sets them, and written with the rest of
# what the local agent runs with to the data directory's optout.env, which the agent and every `optout` command
# read under the environment: a second shell needs nothing exported. The Asterisk sandbox is started where it
# can be (root on a Debian-like machine); then the agent runs in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run
secrets=.run/secrets.env
if [ ! -f "$secrets" ]; then
  umask 077
  for v in ARI_PASSWORD AMI_SECRET AGENT_API_TOKEN; do
    echo "$v=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')"
  done > "$secrets"
  echo "run: generated credentials in $secrets" >&2
fi
given_ari="${ARI_PASSWORD:-}" given_ami="${AMI_SECRET:-}" given_token="${AGENT_API_TOKEN:-}"
set -a
# shellcheck disable=SC1090
. "$secrets"
set +a
export ARI_PASSWORD="${given_ari:-$ARI_PASSWORD}" AMI_SECRET="${given_ami:-$AMI_SECRET}"
export AGENT_API_TOKEN="${given_token:-$AGENT_API_TOKEN}"
export AMI_HOST="${AMI_HOST:-127.0.0.1}" AMI_USERNAME="${AMI_USERNAME:-optout}"

# One place for the store, the journal and these settings: the agent and every command find them there.
data_dir="${OPTOUT_DATA_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/optout-agent}"
mkdir -p "$data_dir"
( umask 077
  { echo "# written by make run ($(date -u +%FT%TZ)): what the local agent runs with; the environment wins"
    for v in ARI_PASSWORD AMI_SECRET AGENT_API_TOKEN AMI_HOST AMI_USERNAME; do echo "$v=${!v}"; done
  } > "$data_dir/optout.env.tmp" && mv "$data_dir/optout.env.tmp" "$data_dir/optout.env" )

if [ -z "${ASTERISK_EXTERNAL:-}" ] && [ -x asterisk-docker/sandbox ]; then
  if [ "$(id -u)" = 0 ]; then
    asterisk-docker/sandbox up
  else
    echo "run: not root, so the Asterisk sandbox is not started; point ARI_URL at your Asterisk" >&2
  fi
fi
exec .venv/bin/python -m agent

#!/usr/bin/env bash
# `make images`: build the three container images with Podman and smoke-test them together.
#
#   asterisk-docker/Dockerfile        -> localhost/optout-asterisk:dev
#   asterisk-docker/Dockerfile.agent  -> localhost/optout-agent:dev
#   sns_bridge/Dockerfile.lambda      -> localhost/optout-sns-lambda:dev
#
# No image registry is reachable here, so every image is built on a Debian sid base imported from the
# Asterisk sandbox's root (or, when that cache is absent, from a fresh debootstrap root), with the build
# arguments the Dockerfiles document; Python wheels are fetched on the host into asterisk-docker/wheelhouse
# and installed with --no-index. The smoke test then runs Asterisk and the agent with the host's network,
# PostgreSQL (database optout_images) and Redis (database 11), on ports of their own so a running sandbox and
# the test suite are not disturbed; places a test call that presses 9 (`optout call --via local` inside the
# agent container); checks the hangup and the blacklist in PostgreSQL and Redis from the host; then invokes the
# Lambda image's handler with an SNS event and checks its number in PostgreSQL. Everything it starts is removed
# on exit, also on failure. Secrets are generated per run and never written outside a temp dir (mode 700).
#
# Variables: ASTERISK_SANDBOX_ROOT (/var/cache/optout-agent/asterisk-root, read only)
#   IMAGES_DATABASE_URL (postgresql://postgres@127.0.0.1:5432/optout_images)  IMAGES_REDIS_URL (redis://127.0.0.1:6379/11)
#   IMAGES_KEEP_CONTAINERS=1 leaves the containers running for a look (remove them with `podman rm -f`).
#   IMAGES_SPEECH=1 also builds localhost/optout-agent-speech:dev (Dockerfile.agent with EXTRAS=speech: spoken
#   opt-out, about 700 MB more) and checks that the model loads in it, pinned files' SHA-256 included.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
ROOT="${ASTERISK_SANDBOX_ROOT:-/var/cache/optout-agent/asterisk-root}"
ROOT="${ROOT%/}"
WHEEL_CACHE=/var/cache/optout-agent/wheelhouse
BASE_IMAGE=localhost/debian:sid
APT_OPTIONS="-o Acquire::Check-Valid-Until=false"  # the mirror's sid Release file reads as expired here
IMG_ASTERISK=localhost/optout-asterisk:dev
IMG_AGENT=localhost/optout-agent:dev
IMG_AGENT_SPEECH=localhost/optout-agent-speech:dev
IMG_LAMBDA=localhost/optout-sns-lambda:dev
IMG_AGENT_RUNTIME=localhost/optout-agent-runtime:dev   # the agent's first stage: tells the Python version
DB_URL="${IMAGES_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/optout_images}"
REDIS_URL_IMAGES="${IMAGES_REDIS_URL:-redis://127.0.0.1:6379/11}"
# Ports of its own: the sandbox holds 8088/5038/4573/5160/20000-20999 and the tests 8080-ish.
ARI_PORT=18088 AMI_PORT_IMAGES=15038 AGI_PORT_IMAGES=14573 SIP_PORT=15160 RTP_START=21000 RTP_END=21099
HTTP_PORT=18080
ARI_APP_IMAGES=optout-agent-images
NUMBER_CALL=+15550100901     # pressed 9 on the test call
NUMBER_LAMBDA=+15550100902   # arrives through the Lambda handler

export PGOPTIONS="-c client_min_messages=warning"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
RUN_ID="$$"
C_ASTERISK="optout-images-asterisk-$RUN_ID"
C_AGENT="optout-images-agent-$RUN_ID"
C_LAMBDA="optout-images-lambda-$RUN_ID"

say() { printf 'images: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# --- timings -------------------------------------------------------------------------------------------
TIMINGS=()
PHASE="" PHASE_START=0 ALL_START="$(date +%s.%N)"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
phase() {
    end_phase
    PHASE="$1" PHASE_START="$(date +%s.%N)"
    say "== $PHASE"
}
end_phase() {
    [[ -n "$PHASE" ]] || return 0
    TIMINGS+=("$(printf '%-28s %6s s' "$PHASE" "$(elapsed "$PHASE_START")")")
    PHASE=""
}
print_timings() {
    end_phase
    printf 'images: timings\n' >&2
    printf 'images:   %s\n' "${TIMINGS[@]}" >&2
    printf 'images:   %-28s %6s s\n' total "$(elapsed "$ALL_START")" >&2
}

# --- cleanup -------------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/optout-images.XXXXXX)"
chmod 700 "$WORK"
# Unmount what an interrupted debootstrap left mounted under $1, then remove it without crossing filesystems.
remove_tree() {
    local mnt
    [[ -e "$1" ]] || return 0
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v d="$1/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system "$1"
}
cleanup() {
    local rc=$?
    set +e
    if [[ $rc -ne 0 ]]; then
        for c in "$C_ASTERISK" "$C_AGENT"; do
            if "${PODMAN[@]}" container exists "$c" 2>/dev/null; then
                say "last log lines of $c:"
                "${PODMAN[@]}" logs --tail 25 "$c" 2>&1 | sed 's/^/    /' >&2
            fi
        done
    fi
    if [[ "${IMAGES_KEEP_CONTAINERS:-}" != 1 ]]; then
        for c in "$C_LAMBDA" "$C_AGENT" "$C_ASTERISK"; do
            "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1
        done
        if [[ -n "${DB_CREATED:-}" ]]; then
            psql "${DB_URL%/*}/postgres" -qc "DROP DATABASE IF EXISTS \"${DB_URL##*/}\" WITH (FORCE)" >/dev/null 2>&1
        fi
        [[ -n "${REDIS_USED:-}" ]] && redis-cli -u "$REDIS_URL_IMAGES" FLUSHDB >/dev/null 2>&1
    fi
    remove_tree "$WORK"
    rm -f "$HERE"/wheelhouse/*.whl
    print_timings
    if [[ $rc -eq 0 ]]; then say "OK: three images built, call hung up and blacklisted, Lambda stored its number"
    else say "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- tools ---------------------------------------------------------------------------------------------
phase "tools"
[[ $EUID -eq 0 ]] || die "must run as root (podman with host networking, apt-get, debootstrap)"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get install -y "${missing[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }
fi
for tool in psql redis-cli curl python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (make services installs PostgreSQL and Redis)"
done
pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL does not answer at 127.0.0.1:5432 (make services)"
[[ "$(redis-cli -u "$REDIS_URL_IMAGES" PING 2>/dev/null)" == PONG ]] || die "Redis does not answer at $REDIS_URL_IMAGES"

# --- base image ----------------------------------------------------------------------------------------
# The first Debian URI of the machine's own apt sources (never a hard-coded host), as the sandbox does.
debian_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/*.sources)"
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i !~ /security/) { print $i; exit } break } }' \
            /etc/apt/sources.list)"
    fi
    [[ -n "$uri" ]] || die "no Debian mirror URI found in the machine's apt sources"
    printf '%s' "$uri"
}

import_root() {
    # /opt/optout is the live sandbox's rendered config (its secrets): never part of an image. A file that
    # changes while tar reads it (exit 1) is harmless here; anything worse fails the import.
    local status
    set +e
    tar -C "$1" --exclude=./proc --exclude=./sys --exclude=./dev --exclude=./opt/optout -c . |
        "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null
    status=("${PIPESTATUS[@]}")
    set -e
    ((status[0] <= 1)) || die "tar of $1 failed (exit ${status[0]})"
    ((status[1] == 0)) || die "podman import failed (exit ${status[1]})"
}

phase "base image"
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    say "$BASE_IMAGE is present"
elif [[ -x "$ROOT/usr/sbin/asterisk" ]]; then
    say "importing $BASE_IMAGE from the sandbox's root $ROOT (read only)"
    import_root "$ROOT"
else
    command -v debootstrap >/dev/null || apt-get install -y debootstrap >/dev/null
    say "no sandbox root at $ROOT: debootstrap Debian sid with asterisk into a temp dir"
    mkdir -p "$WORK/root"
    debootstrap --variant=minbase --include=asterisk,asterisk-modules sid "$WORK/root" "$(debian_mirror)" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    import_root "$WORK/root"
    remove_tree "$WORK/root"
fi

build() {  # build IMAGE DOCKERFILE [podman build options...]
    local image="$1" file="$2"
    shift 2
    "${PODMAN[@]}" build "${LIMITS[@]}" -q -f "$file" -t "$image" --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "APT_OPTIONS=$APT_OPTIONS" "$@" "$REPO" >/dev/null
}

phase "build asterisk"
build "$IMG_ASTERISK" "$HERE/Dockerfile"

# --- wheels --------------------------------------------------------------------------------------------
# Wheels for the images' Python, fetched on the host with its own pip configuration (no index URL in any
# file); kept per pyproject.toml and Python version, so a warm build copies identical bytes and Podman reuses
# the dependency layers.
phase "wheels"
build "$IMG_AGENT_RUNTIME" "$HERE/Dockerfile.agent" --target runtime --build-arg "APT_PACKAGES=python3 python3-venv"
PYVER="$("${PODMAN[@]}" run --rm "${LIMITS[@]}" "$IMG_AGENT_RUNTIME" \
    python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PIP=(python3 -m pip)
[[ -x "$REPO/.venv/bin/pip" ]] && PIP=("$REPO/.venv/bin/pip")
key="$(sha1sum <"$REPO/pyproject.toml" | cut -c1-12)-py$PYVER"
if [[ ! -f "$WHEEL_CACHE/$key/.complete" ]]; then
    say "fetching wheels for Python $PYVER on the host"
    rm -rf "$WHEEL_CACHE/$key" "$WORK/host-wheels"
    mkdir -p "$WHEEL_CACHE/$key"
    # Dependencies published only as source (aioari, ...) are built into pure wheels with the host's Python;
    # the rest come as binary wheels for the images' Python.
    "${PIP[@]}" wheel -q --disable-pip-version-check -w "$WORK/host-wheels" "$REPO" 2>&1 | grep -v 'is ignored' >&2 || true
    project_wheel="$(ls "$WORK"/host-wheels/optout_agent-*.whl)"
    "${PIP[@]}" download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --find-links "$WORK/host-wheels" -d "$WHEEL_CACHE/$key" \
        "$project_wheel" "setuptools>=68" 2>&1 | grep -v 'is ignored' >&2 || true
    rm -f "$WHEEL_CACHE/$key"/optout_agent-*.whl
    ls "$WHEEL_CACHE/$key"/aioari-*.whl >/dev/null 2>&1 || die "wheel download for Python $PYVER failed"
    touch "$WHEEL_CACHE/$key/.complete"
fi
rm -f "$HERE"/wheelhouse/*.whl
cp -p "$WHEEL_CACHE/$key"/*.whl "$HERE/wheelhouse/"
say "$(ls "$HERE"/wheelhouse/*.whl | wc -l) wheels for Python $PYVER in asterisk-docker/wheelhouse"

phase "build agent"
build "$IMG_AGENT" "$HERE/Dockerfile.agent" --build-arg "APT_PACKAGES=python3 python3-venv" \
    --build-arg "PIP_OPTIONS=--no-index"

if [[ "${IMAGES_SPEECH:-0}" == 1 ]]; then
    phase "build agent (speech)"
    speech_key="$key-speech"
    if [[ ! -f "$WHEEL_CACHE/$speech_key/.complete" ]]; then
        rm -rf "$WHEEL_CACHE/$speech_key" && mkdir -p "$WHEEL_CACHE/$speech_key"
        python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["speech"]))' \
            "$REPO/pyproject.toml" >"$WORK/speech-requirements.txt"
        "${PIP[@]}" download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYVER" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d "$WHEEL_CACHE/$speech_key" \
            -r "$WORK/speech-requirements.txt" 2>&1 | grep -v 'is ignored' >&2 || true
        ls "$WHEEL_CACHE/$speech_key"/onnxruntime-*.whl >/dev/null 2>&1 || die "speech wheel download failed"
        touch "$WHEEL_CACHE/$speech_key/.complete"
    fi
    cp -p "$WHEEL_CACHE/$speech_key"/*.whl "$HERE/wheelhouse/"
    build "$IMG_AGENT_SPEECH" "$HERE/Dockerfile.agent" --build-arg "APT_PACKAGES=python3 python3-venv" \
        --build-arg "PIP_OPTIONS=--no-index" --build-arg "EXTRAS=speech"
    "${PODMAN[@]}" run --rm "${LIMITS[@]}" "$IMG_AGENT_SPEECH" python3 -c \
        'from agent.speech.model import Recogniser; Recogniser(); print("speech model loaded")' >&2 \
        || die "the speech image cannot load its model"
fi

phase "build lambda"
build "$IMG_LAMBDA" "$REPO/sns_bridge/Dockerfile.lambda" --build-arg "APT_PACKAGES=python3 python3-pip" \
    --build-arg "PIP_OPTIONS=--no-index --break-system-packages"

# --- smoke test: Asterisk + agent --------------------------------------------------------------------
phase "start asterisk + agent"
secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
umask 077
cat >"$WORK/asterisk.env" <<EOF
ARI_URL=http://127.0.0.1:$ARI_PORT
ARI_USERNAME=optout
ARI_PASSWORD=$(secret)
ARI_APP=$ARI_APP_IMAGES
AMI_PORT=$AMI_PORT_IMAGES
AGI_HOST=127.0.0.1
AGI_PORT=$AGI_PORT_IMAGES
SANDBOX_SIP_PORT=$SIP_PORT
SANDBOX_RTP_START=$RTP_START
SANDBOX_RTP_END=$RTP_END
EOF
{
    cat "$WORK/asterisk.env"
    echo "AGENT_HTTP_PORT=$HTTP_PORT"
    echo "AGENT_API_TOKEN=$(secret)"
    echo "DATABASE_URL=$DB_URL"
    echo "REDIS_URL=$REDIS_URL_IMAGES"
    echo "LOG_FULL_NUMBERS=true"
} >"$WORK/agent.env"
umask 022
ari_password="$(sed -n 's/^ARI_PASSWORD=//p' "$WORK/asterisk.env")"

for port in "$ARI_PORT" "$AGI_PORT_IMAGES" "$HTTP_PORT"; do
    ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "port $port is taken on 127.0.0.1"
done

psql "${DB_URL%/*}/postgres" -qc "DROP DATABASE IF EXISTS \"${DB_URL##*/}\" WITH (FORCE)" >/dev/null
psql "${DB_URL%/*}/postgres" -qc "CREATE DATABASE \"${DB_URL##*/}\"" >/dev/null
DB_CREATED=1
REDIS_USED=1
redis-cli -u "$REDIS_URL_IMAGES" FLUSHDB >/dev/null

"${PODMAN[@]}" run -d --name "$C_ASTERISK" "${LIMITS[@]}" --env-file "$WORK/asterisk.env" "$IMG_ASTERISK" >/dev/null
"${PODMAN[@]}" run --rm "${LIMITS[@]}" --env-file "$WORK/agent.env" "$IMG_AGENT" optout migrate >/dev/null
"${PODMAN[@]}" run -d --name "$C_AGENT" "${LIMITS[@]}" --env-file "$WORK/agent.env" "$IMG_AGENT" >/dev/null

ari_code() {
    printf 'user = "optout:%s"\n' "$ari_password" |
        curl -s -o /dev/null -w '%{http_code}' --max-time 2 -K - "http://127.0.0.1:$ARI_PORT/ari/asterisk/info" || true
}
deadline=$((SECONDS + 60))
until [[ "$(ari_code)" == 200 ]]; do
    ((SECONDS < deadline)) || die "Asterisk's ARI did not answer at 127.0.0.1:$ARI_PORT"
    [[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$C_ASTERISK")" == true ]] || die "the Asterisk container exited"
    sleep 0.3
done
say "Asterisk $("${PODMAN[@]}" exec "$C_ASTERISK" asterisk -C /opt/optout/etc/asterisk.conf -rx 'core show version' | cut -d' ' -f2) answers ARI at 127.0.0.1:$ARI_PORT"
until curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$HTTP_PORT/ready"; do
    ((SECONDS < deadline)) || die "the agent's /ready did not answer 200 at 127.0.0.1:$HTTP_PORT"
    [[ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$C_AGENT")" == true ]] || die "the agent container exited"
    sleep 0.3
done
say "the agent is ready (ARI app $ARI_APP_IMAGES, AGI 127.0.0.1:$AGI_PORT_IMAGES, HTTP 127.0.0.1:$HTTP_PORT)"

phase "test call (press 9)"
"${PODMAN[@]}" exec "$C_AGENT" optout call "$NUMBER_CALL" --via local --ivr ari | tee "$WORK/call.out" >&2 ||
    die "optout call did not report a hangup"
grep -q '^hung up: yes' "$WORK/call.out" || die "the call was not hung up"
psql_value() { psql "$DB_URL" -XAtc "$1"; }
[[ "$(psql_value "SELECT count(*) FROM blacklist WHERE phone_number = '$NUMBER_CALL'")" == 1 ]] ||
    die "$NUMBER_CALL is not in PostgreSQL's blacklist"
[[ "$(psql_value "SELECT count(*) FROM optout_actions WHERE phone_number = '$NUMBER_CALL'")" -ge 1 ]] ||
    die "$NUMBER_CALL has no audit row in optout_actions"
[[ "$(redis-cli -u "$REDIS_URL_IMAGES" SISMEMBER blacklist:numbers "$NUMBER_CALL")" == 1 ]] ||
    die "$NUMBER_CALL is not in Redis's blacklist:numbers"
say "$NUMBER_CALL: hung up, in PostgreSQL (blacklist, optout_actions) and Redis (blacklist:numbers)"

# --- smoke test: Lambda ------------------------------------------------------------------------------
phase "lambda handler"
python3 - "$NUMBER_LAMBDA" >"$WORK/event.json" <<'EOF'
import json, sys, uuid
message = {"callId": "images-lambda-call", "campaignId": "images", "contactId": "images-contact",
           "phoneNumber": sys.argv[1], "dtmfInput": "9", "timestamp": "2026-11-25T12:00:00Z"}
print(json.dumps({"Records": [{"EventSource": "aws:sns", "Sns": {
    "Type": "Notification", "MessageId": str(uuid.uuid4()),
    "TopicArn": "arn:aws:sns:us-east-1:123456789012:optout-events", "Message": json.dumps(message),
    "MessageAttributes": {"origin": {"Type": "String", "Value": "images-smoke-test"}}}}]}))
EOF
"${PODMAN[@]}" run --rm -i --name "$C_LAMBDA" "${LIMITS[@]}" -e "DATABASE_URL=$DB_URL" -e "REDIS_URL=$REDIS_URL_IMAGES" \
    "$IMG_LAMBDA" python3 -c 'import json, sys; from sns_bridge.lambda_handler import handler; print(json.dumps(handler(json.load(sys.stdin), None)))' \
    <"$WORK/event.json" | tee "$WORK/lambda.out" >&2
python3 -c 'import json, sys; s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); sys.exit(0 if s["applied"] == 1 else 1)' \
    "$WORK/lambda.out" || die "the Lambda handler did not apply the opt-out"
[[ "$(psql_value "SELECT count(*) FROM blacklist WHERE phone_number = '$NUMBER_LAMBDA'")" == 1 ]] ||
    die "$NUMBER_LAMBDA (from the Lambda handler) is not in PostgreSQL's blacklist"
say "$NUMBER_LAMBDA: applied by the Lambda handler, in PostgreSQL"
end_phase

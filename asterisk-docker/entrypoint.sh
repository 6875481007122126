#!/bin/sh
# Container entrypoint: render the same config the sandbox renders, then run Asterisk in the
# foreground (PID 1 of the container is this script's exec'd asterisk).
set -eu
python3 /opt/optout/src/asterisk-docker/render_config.py /opt/optout/etc \
    /opt/optout/src/asterisk-docker/conf /opt/optout/src/dialplan
exec asterisk -f -C /opt/optout/etc/asterisk.conf "$@"

#!/bin/sh
# redis-cli against this pod's own server, for the probes and for operators (`kubectl exec ... --
# /scripts/redis-cli.sh INFO`): authenticated from the mounted Secret file, over TLS when a
# certificate is mounted. Paths as in redis-start.sh.
set -eu
REDISCLI_AUTH="$(cat "$REDIS_PASSWORD_FILE")"
export REDISCLI_AUTH
tls="${REDIS_TLS_DIR:-/etc/redis/tls}"
port="${REDIS_PORT:-6379}"
if [ -f "$tls/tls.crt" ]; then
  exec redis-cli --tls --cacert "$tls/ca.crt" -h 127.0.0.1 -p "$port" "$@"
fi
exec redis-cli -h 127.0.0.1 -p "$port" "$@"

#!/bin/sh
# Starts redis-server for both Redis StatefulSets (adapter store and GCS store). Secrets are read from
# the mounted Secret file ($REDIS_PASSWORD_FILE) into a 0600 include on a memory volume: never into
# argv (visible in ps), the env, or the ConfigMap. A certificate mounted in $REDIS_TLS_DIR switches the
# server to TLS only (port 0: no plaintext listener at all). The paths default to the pod's mounts
# (redis.yaml); tests/integration/test_deploy_runtime.py runs this script with its own.
set -eu
umask 077
run="${REDIS_RUN_DIR:-/run/redis}"
tls="${REDIS_TLS_DIR:-/etc/redis/tls}"
port="${REDIS_PORT:-6379}"
password="$(cat "$REDIS_PASSWORD_FILE")"
printf 'requirepass "%s"\nmaxmemory %s\n' "$password" "$REDIS_MAXMEMORY" > "$run/runtime.conf"
scheme=redis
if [ -f "$tls/tls.crt" ]; then
  scheme=rediss
  cat >> "$run/runtime.conf" <<TLS
port 0
tls-port $port
tls-cert-file $tls/tls.crt
tls-key-file $tls/tls.key
tls-ca-cert-file $tls/ca.crt
tls-auth-clients no
TLS
else
  printf 'port %s\n' "$port" >> "$run/runtime.conf"
fi
# redis_exporter (sidecar) reads the password from a JSON map {address: password}, same volume, 0600.
printf '{"%s://localhost:%s": "%s"}\n' "$scheme" "$port" "$password" > "$run/exporter-passwords.json"
exec redis-server "${REDIS_CONF:-/etc/redis/redis.conf}"

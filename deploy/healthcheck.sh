#!/usr/bin/env bash
# Docker HEALTHCHECK: GET /healthz on the port of FOVEA_HTTP_ADDR (default
# 8080) with bash's /dev/tcp, so the slim image needs no curl. Exit 0 on 200.
set -u
addr="${FOVEA_HTTP_ADDR:-0.0.0.0:8080}"
port="${addr##*:}"
host="${FOVEA_HEALTHCHECK_HOST:-127.0.0.1}"
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
IFS= read -r -t "${FOVEA_HEALTHCHECK_TIMEOUT_S:-3}" status <&3 || exit 1
[[ "$status" =~ ^HTTP/1\.[01]\ 200 ]]

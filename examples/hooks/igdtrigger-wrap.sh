#!/bin/sh
# igdtrigger-wrap.sh RULE [--] COMMAND [ARGS...]
#
# Ports of RULE open while COMMAND runs, for machines with only sh and curl (no Python): talks to
# an igdtrigger service over its HTTP API. Like `igdtrigger run`: fails open (the command runs
# even when the service is down), holds the activation by heartbeat (a killed wrapper's ports
# lapse after TTL seconds), forwards TERM/INT/HUP to the command and exits with its status.
#
#   IGDTRIGGER_SERVER  service URL (default http://127.0.0.1:8731)
#   IGDTRIGGER_TOKEN   admin token (optional; without it the ports go to this host's address)
#   IGDTRIGGER_TTL     heartbeat ttl in seconds (default 30)
set -u
[ $# -ge 2 ] || { echo "usage: $0 RULE [--] COMMAND [ARGS...]" >&2; exit 2; }
server=${IGDTRIGGER_SERVER:-http://127.0.0.1:8731}
ttl=${IGDTRIGGER_TTL:-30}
rule=$1
shift
[ "$1" = "--" ] && shift

api() {  # api METHOD PATH [JSON]
    set -- "$1" "$2" "${3:-}"
    if [ -n "${IGDTRIGGER_TOKEN:-}" ]; then
        curl -fsS --max-time 3 -X "$1" -H "Authorization: Bearer $IGDTRIGGER_TOKEN" \
            -H 'Content-Type: application/json' ${3:+-d "$3"} "$server$2"
    else
        curl -fsS --max-time 3 -X "$1" -H 'Content-Type: application/json' \
            ${3:+-d "$3"} "$server$2"
    fi
}

id=$(api POST /api/v1/activations "{\"rule\": \"$rule\", \"ttl\": $ttl, \"source\": \"run\"}" \
    2>/dev/null | grep -o '"id": *"[^"]*"' | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/')
if [ -z "$id" ]; then
    echo "igdtrigger-wrap: no activation from $server; running without open ports" >&2
else
    export IGDTRIGGER_ACTIVATION="$id"
    beat=$(( ttl / 3 )); [ "$beat" -ge 1 ] || beat=1
    ( while sleep "$beat"; do
          api POST "/api/v1/activations/$id/refresh" "{\"ttl\": $ttl}" >/dev/null 2>&1
      done ) &
    heartbeat=$!
fi

"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM
trap 'kill -INT $child 2>/dev/null' INT
trap 'kill -HUP $child 2>/dev/null' HUP
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break   # a trapped signal interrupted wait: wait again
done
trap - TERM INT HUP
if [ -n "$id" ]; then
    kill "$heartbeat" 2>/dev/null
    api DELETE "/api/v1/activations/$id" >/dev/null 2>&1 ||
        echo "igdtrigger-wrap: could not end activation $id; it lapses in ${ttl}s" >&2
fi
exit "$status"

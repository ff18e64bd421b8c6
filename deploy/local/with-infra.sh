#!/usr/bin/env bash
# Runs a command with the project's PostgreSQL and Kafka up: starts whichever is not
# running, runs the command, and stops again only what it started. Exit code: the command's.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

started=()
if ! bash "$here/postgres.sh" status >/dev/null 2>&1; then
  bash "$here/postgres.sh" start || exit 1
  started+=(postgres)
fi
if ! bash "$here/kafka.sh" status >/dev/null 2>&1; then
  bash "$here/kafka.sh" start || { for s in "${started[@]}"; do bash "$here/$s.sh" stop; done; exit 1; }
  started+=(kafka)
fi

"$@"
status=$?

for s in "${started[@]}"; do
  bash "$here/$s.sh" stop >/dev/null 2>&1 || true
done
exit $status

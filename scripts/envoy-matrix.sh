#!/usr/bin/env bash
# `make test-envoy-matrix`: the routing, plugin, gRPC, delta and health suites
# (`make test-matrix-suites`) against each Envoy version named (`make test-matrix-suites ENVOY_VERSION=<v>`, which
# installs it into its own venv when missing). Every version runs even when
# one fails; then a table gives each version's result, test counts and wall
# time, and the exit status is 1 if any version failed.
set -uo pipefail
cd "$(dirname "$0")/.."

[ $# -gt 0 ] || { echo "usage: $0 VERSION..." >&2; exit 2; }
# The suites `make test-matrix-suites` runs: a version passes only if every
# one of them reported a result.
SUITES=5
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rows=()
total_passed=0
total_failed=0
for version in "$@"; do
  printf '\n=== Envoy %s: routing, plugin, grpc, delta, health ===\n' "$version"
  started=$(date +%s)
  "${MAKE:-make}" --no-print-directory test-matrix-suites ENVOY_VERSION="$version" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  seconds=$(($(date +%s) - started))
  # cargo's "test result: ok. 7 passed; 0 failed; ..." lines, one per suite.
  read -r suites passed failed < <(awk '/^test result: / {
      for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
      n++ } END { print n+0, p+0, f+0 }' "$log")
  if [ "$status" -eq 0 ] && [ "$suites" -eq "$SUITES" ]; then result=ok; else result=FAILED; fi
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  rows+=("$(printf '%-8s  %-6s  %3d passed  %3d failed  %4d s' "$version" "$result" "$passed" "$failed" "$seconds")")
done

printf '\nEnvoy version matrix (routing, plugin, grpc, delta, health suites):\n'
printf '  %s\n' "${rows[@]}"
printf 'matrix: %d passed, %d failed\n' "$total_passed" "$total_failed"
for row in "${rows[@]}"; do
  case "$row" in *FAILED*) exit 1 ;; esac
done

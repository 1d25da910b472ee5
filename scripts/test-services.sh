#!/usr/bin/env bash
# System packages the tests use (headless Chromium for the review-page test, a PostgreSQL server
# for the label store). Installed once with apt when running as root; otherwise those tests skip
# with a reason, unless ASTRID_REQUIRE_SERVICES=1.
set -u
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x "$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n1)/initdb" ] || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages for tests: ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
    >/tmp/astrid-apt.log 2>&1 || echo "warning: apt-get install ${need[*]} failed (see /tmp/astrid-apt.log)"
else
  echo "note: ${need[*]} not installed and not root; tests needing them will skip"
fi
exit 0

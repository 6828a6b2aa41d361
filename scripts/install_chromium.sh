#!/usr/bin/env bash
# Debian's Chromium, pinned, for the browser tests (tests/browser drives it with Playwright, which downloads no
# browser). Needs root and apt (CI: .ci/run); does nothing when that version is installed already.
set -euo pipefail
CHROMIUM_VERSION="150.0.7871.100-1~deb12u1"   # what `apt-cache policy chromium` offers on Debian 12 (bookworm)

installed=$(dpkg-query -W -f='${Version}' chromium 2>/dev/null || true)
if [ "$installed" = "$CHROMIUM_VERSION" ] && [ -x /usr/bin/chromium ]; then
    echo "chromium: $CHROMIUM_VERSION already installed"
    exit 0
fi
echo "chromium: installing $CHROMIUM_VERSION (found: ${installed:-none})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "chromium=$CHROMIUM_VERSION" "chromium-common=$CHROMIUM_VERSION"

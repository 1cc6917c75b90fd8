#!/bin/sh
# The playground's browser test drives Debian's Chromium through chromedriver. Installs both once
# (root or sudo, Debian or Ubuntu); a no-op where they are already there.
set -e
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get install -y -q chromium chromium-driver >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }

#!/usr/bin/env bash
# System packages napari's Qt needs on a headless Linux machine: Xvfb and the xcb libraries.
# Installs them with apt-get when run as root on Debian/Ubuntu; otherwise says what is missing.
set -u
pkgs=(xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
      libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3)
[ "$(uname -s)" = Linux ] || exit 0
command -v dpkg-query >/dev/null 2>&1 || { echo "setup_system: not Debian-like; install Xvfb and the xcb libraries yourself"; exit 0; }
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup_system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup_system: napari tests need these Debian packages: ${missing[*]}"
  echo "  sudo apt-get install ${missing[*]}"
fi

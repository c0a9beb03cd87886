#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: data packages (as root), a venv in .venv with the
# CPU build of torch pinned first (a bare `torch` would pull a multi-GB CUDA build), then vqtok.
# Usage: bash scripts/setup.sh [extra]   (extra: dev, s3, bench; default dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
compgen -G "/usr/share/wallpapers/*/contents/images/*.jpg" >/dev/null || need_apt+=(plasma-workspace-wallpapers)
# the training benchmark judges photos32 on photographs from other packages than the wallpapers
if [ "$extra" = bench ]; then
  [ -d /usr/share/backgrounds/mate/nature ] || need_apt+=(mate-backgrounds)
  [ -f /usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg ] || need_apt+=(lomiri-wallpapers-20.04)
  [ -f /usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg ] || need_apt+=(lomiri-wallpapers-16.04)
  # the bar's set: photographs of packages that ship no wallpapers at all
  [ -f /usr/share/doc/opencv-doc/examples/data/baboon.jpg ] || need_apt+=(opencv-doc)
  [ -f /usr/lib/python3/dist-packages/skimage/data/astronaut.png ] || need_apt+=(python3-skimage)
  [ -d /usr/share/palapeli/collection ] || need_apt+=(palapeli-data)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "[setup] missing Debian packages ${need_apt[*]}: run 'sudo apt-get install ${need_apt[*]}'" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  echo "[setup] pip install torch==2.13.0 (CPU build)"
  $py -m pip install -q --disable-pip-version-check torch==2.13.0
fi
echo "[setup] pip install -e .[$extra]"
$py -m pip install -q --disable-pip-version-check -e ".[$extra]"

#!/usr/bin/env bash
# Installs the real image-caption sources of the demo (no model hub needed):
#   DEST/emoji-datasource-google/   Google Noto emoji (Apache-2.0): emoji.json + img/google/64/*.png
#   DEST/emoji-datasource-twitter/  Twitter emoji (CC-BY-4.0): the same emoji by another artist (held-out style)
#   /usr/share/openclipart/         Openclipart (public domain), optional: Debian's openclipart-png/-svg
# Usage: scripts/get_demo_data.sh [DEST]      (default DEST=data/sources)
# Idempotent: what is already there is kept. Set OPENCLIPART=0 to skip the (optional) Openclipart step.
set -euo pipefail

DEST="${1:-data/sources}"
EMOJI_VERSION="${EMOJI_VERSION:-16.0.0}"
OPENCLIPART="${OPENCLIPART:-1}"
mkdir -p "$DEST"

fetch_emoji() {  # $1 = google | twitter
    local set="$1" pkg="emoji-datasource-$1" dir="$DEST/emoji-datasource-$1"
    if [ -f "$dir/emoji.json" ] && [ -d "$dir/img/$set/64" ]; then
        echo "[get_demo_data] $pkg: already in $dir ($(find "$dir/img/$set/64" -name '*.png' | wc -l) PNGs)"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "[get_demo_data] error: npm is needed to fetch $pkg (apt-get install npm)" >&2
        return 1
    fi
    local tmp
    tmp="$(mktemp -d)"
    echo "[get_demo_data] $pkg@$EMOJI_VERSION: npm pack"
    (cd "$tmp" && npm pack --silent "$pkg@$EMOJI_VERSION" >/dev/null)
    mkdir -p "$tmp/x"
    # only the catalogue, the 64 px images and the licence; not the sprite sheets
    tar -xzf "$tmp"/"$pkg"-*.tgz -C "$tmp/x" --strip-components=1 \
        package/emoji.json package/LICENSE package/README.md "package/img/$set/64"
    rm -rf "$dir"
    mv "$tmp/x" "$dir"
    rm -rf "$tmp"
    echo "[get_demo_data] $pkg: $(find "$dir/img/$set/64" -name '*.png' | wc -l) PNGs in $dir"
}

fetch_emoji google
fetch_emoji twitter

# Openclipart is optional: PNGs (and SVGs with titles and keywords) from Debian; never fail on it.
if [ "$OPENCLIPART" = "0" ]; then
    echo "[get_demo_data] openclipart: skipped (OPENCLIPART=0)"
elif [ -d /usr/share/openclipart/png ] || [ -d /usr/share/openclipart/svg ]; then
    echo "[get_demo_data] openclipart: already in /usr/share/openclipart ($(ls /usr/share/openclipart | tr '\n' ' '))"
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "[get_demo_data] openclipart: apt-get is not available here; skipped (optional)"
else
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" = "none" ]; then
        echo "[get_demo_data] openclipart: needs root for apt-get; skipped (optional)"
    else
        echo "[get_demo_data] openclipart: apt-get install openclipart-png openclipart-svg"
        if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q openclipart-png openclipart-svg >/dev/null 2>&1; then
            $SUDO apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q openclipart-png openclipart-svg >/dev/null 2>&1 \
                || echo "[get_demo_data] openclipart: apt-get install failed; skipped (optional)"
        fi
    fi
fi
echo "[get_demo_data] done: $DEST"

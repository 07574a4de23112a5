#!/usr/bin/env bash
# What `make run` needs at run time to render invoices and credit notes as PDF in en, zh, ru, ar, kk,
# uz and tr: fonts covering Latin, Cyrillic (incl. Kazakh), Uzbek Latin, Turkish, Arabic and CJK
# (Debian: fonts-noto-core, fonts-noto-cjk) and HarfBuzz's subsetter (libharfbuzz-subset0: font
# subsetting for small, byte-for-byte reproducible PDFs). Installs only what is missing, as root or
# with sudo; when it cannot, it says what to install and carries on (the gateway runs; a PDF that
# needs a missing font then fails with an error naming it, never with boxes). RUNTIME_DEPS_STRICT=1
# makes a missing dependency an error instead.
set -euo pipefail

# (outputs are captured, not piped into grep -q: with pipefail an early-exiting grep fails the pipe)
fonts=$(fc-list : file 2>/dev/null || true)
libs=$(ldconfig -p 2>/dev/null || true)
has_font() { [[ "$fonts" == *"$1"* ]]; }
has_lang() {  # some font covers the language's orthography (fontconfig's :lang= test)
  [ -n "$(fc-list ":lang=$1" family 2>/dev/null || true)" ]
}

need=()
command -v fc-list >/dev/null || need+=(fontconfig)
core=ok
has_font NotoSans-Regular && has_font NotoSansArabic-Regular || core=missing
for lang in en ru kk uz tr ar; do has_lang "$lang" || core=missing; done
[ "$core" = ok ] || need+=(fonts-noto-core)
has_font NotoSansCJK && has_lang zh-cn || need+=(fonts-noto-cjk)
[[ "$libs" == *libharfbuzz-subset.so.0* ]] || need+=(libharfbuzz-subset0)

if [ ${#need[@]} -eq 0 ]; then exit 0; fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
fi
if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null; then
  echo "runtime-deps: PDF invoices need: ${need[*]} (not installed)." >&2
  echo "runtime-deps: install them with: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
  echo "runtime-deps: (other systems: the Noto Sans, Noto Sans Arabic and Noto Sans CJK SC fonts and HarfBuzz's hb-subset library)" >&2
  [ "${RUNTIME_DEPS_STRICT:-0}" = 1 ] && exit 1
  exit 0
fi
echo "runtime-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
command -v fc-cache >/dev/null && fc-cache -f >/dev/null 2>&1 || true

#!/usr/bin/env bash
# Checks the C build dependencies of clipstream: librdkafka is compiled by
# rdkafka-sys (a C compiler, make) against the system OpenSSL (TLS and SASL
# SCRAM to Kafka), found with pkg-config; nasm assembles libjpeg-turbo's SIMD
# JPEG decoder (without it the build works, and JPEG decoding is 2-3x
# slower). Where they are missing and this runs as root on Debian/Ubuntu,
# installs them with apt-get; else says what to do.
#
#   scripts/build-deps.sh
set -euo pipefail

missing() {
  local m=()
  command -v cc >/dev/null || m+=(gcc)
  command -v make >/dev/null || m+=(make)
  command -v pkg-config >/dev/null || m+=(pkg-config)
  pkg-config --exists openssl 2>/dev/null || m+=(libssl-dev)  # also when pkg-config is missing
  command -v nasm >/dev/null || m+=(nasm)
  echo "${m[@]}"
}

need="$(missing)"
[[ -z "$need" ]] && exit 0
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing the build dependencies: $need" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >&2
  need="$(missing)"
  [[ -z "$need" ]] && exit 0
fi
if [[ "$need" == nasm ]]; then
  echo "warning: nasm is missing: clipstream builds, but decodes JPEGs 2-3x slower without libjpeg-turbo's SIMD code (Debian/Ubuntu: apt-get install nasm; Fedora: dnf install nasm)" >&2
  exit 0
fi
echo "error: building clipstream needs: $need (Debian/Ubuntu: apt-get install $need; Fedora: dnf install gcc make pkgconf openssl-devel nasm)" >&2
exit 1

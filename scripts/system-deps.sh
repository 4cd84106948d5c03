#!/usr/bin/env bash
# System packages for local/test devices: OpenSSH's sshd and iproute2 (network namespaces),
# qemu-user-static and debootstrap (the emulated arm64 device), systemd (systemd-analyze verify).
# Installs them when running as root on Debian/Ubuntu and they are missing; otherwise says what is missing.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ip >/dev/null || need+=(iproute2)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-analyze >/dev/null || need+=(systemd)  # `systemd-analyze verify` checks edgekit serve's unit
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "note: missing ${need[*]} (local devices need them; install as root)" >&2
fi

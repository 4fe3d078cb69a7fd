#!/usr/bin/env bash
# Installs what qemu-bmc and its tests need: Debian packages (as root; otherwise names them and
# stops) and a Python virtual environment in .venv with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  qemu-system-x86 qemu-block-extra ovmf  # QEMU (TCG), its curl block driver, UEFI firmware
  qemu-utils                             # qemu-img (the qcow2 disks of tests/test_redfish_inventory.py)
  ipmitool freeipmi-tools openipmi       # real IPMI clients and the ipmi_sim peer
  freeipmi-bmc-watchdog                  # FreeIPMI's watchdog client (in-band, in the Linux test guest)
  busybox-static cpio                    # the small Linux test guest
  iproute2                               # ip: lab mode's host interfaces (tests/test_lab_nics.py)
  nasm xorriso mtools                    # the tiny boot images the tests build
  docker-compose                         # validates compose.yaml offline
  docker.io debootstrap                  # the compose test's own dockerd and its local base image (tests/test_compose.py)
  wrk                                    # the HTTP load generator of bench/redfish.py
  chromium                               # the browser tests/test_web_console.py drives (Playwright)
  openssh-server                         # a local sshd standing in for a VM's (tests/test_vm_manager.py)
)
if ! python3 -m venv --help >/dev/null 2>&1; then
  DEBIAN_PACKAGES+=(python3-venv python3-pip)
fi

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "qemu-bmc setup: these Debian packages are missing; install them as root and run again:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "qemu-bmc setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# pip runs only when pyproject.toml (or what is installed from it) changed since the last install
# that succeeded: the stamp holds their hash (the code itself is installed editable, so a change to
# it needs no install).
EXTRAS="test"
STAMP=.venv/qemu-bmc-installed
wanted="$(cat pyproject.toml - <<<"extras=$EXTRAS python=$(readlink -f .venv/bin/python)" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ] || [ ! -x .venv/bin/qemu-bmc ]; then
  rm -f "$STAMP"
  # (setuptools' notice on every editable install of a multi-folder layout says nothing to act on)
  export PYTHONWARNINGS="ignore:Editable installation"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  echo "$wanted" >"$STAMP"
fi

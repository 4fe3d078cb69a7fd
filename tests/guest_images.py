"""Tiny bootable test guests, built at test time: a disk image, an ISO and a PXE boot file.

Each runs the same 16-bit boot program (loaded at 0:7C00 by the BIOS from a disk's MBR, from an
El Torito no-emulation CD, or by iPXE as a PXE NBP), which:

* prints its marker (``MARKER-HDD``, ``MARKER-CD``, ``MARKER-PXE``) on COM1;
* prints ``NMI`` from its NMI handler, so an injected NMI is visible;
* enables the ACPI power button event (PM1_EN at PMBASE+2, PMBASE 0x600 on q35) and, when the
  button is pressed (``system_powerdown``), prints ``POWER-BUTTON`` and enters S5 through PM1_CNT,
  as an ACPI-aware OS does: a real guest for soft power-off.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BOOT_PROGRAM = r"""
bits 16
org 0x7c00
PMBASE equ 0x600
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    jmp 0:main
main:
    mov word [2*4], nmi_handler
    mov word [2*4+2], 0
    mov si, marker
    call print
    mov dx, PMBASE+2
    mov ax, 0x0100
    out dx, ax
    sti
idle:
    hlt
    mov dx, PMBASE
    in ax, dx
    test ax, 0x0100
    jz idle
    mov si, button
    call print
    mov dx, PMBASE+4
    mov ax, 0x2000
    out dx, ax
    jmp idle
print:
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    ret
nmi_handler:
    push ax
    push dx
    push si
    mov si, nmi
    call print
    pop si
    pop dx
    pop ax
    iret
marker: db "%(marker)s", 13, 10, 0
nmi: db "NMI", 13, 10, 0
button: db "POWER-BUTTON", 13, 10, 0
times 510-($-$$) db 0
dw 0xaa55
"""


def boot_program(marker: str, workdir: Path) -> bytes:
    source = workdir / f"{marker}.asm"
    source.write_text(BOOT_PROGRAM % {"marker": marker})
    output = workdir / f"{marker}.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(output), str(source)], check=True)
    return output.read_bytes()


class GuestImages:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.disk = directory / "disk.img"
        self.iso = directory / "cd.iso"
        self.tftp = directory / "tftp"
        self.pxe_file = "boot.pxe"

    def build(self) -> GuestImages:
        work = self.directory / "build"
        work.mkdir(parents=True, exist_ok=True)
        self.disk.write_bytes(boot_program("MARKER-HDD", work).ljust(1024 * 1024, b"\0"))
        iso_root = work / "iso"
        iso_root.mkdir(exist_ok=True)
        (iso_root / "boot.img").write_bytes(boot_program("MARKER-CD", work).ljust(2048, b"\0"))
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-b", "boot.img", "-no-emul-boot",
                        "-boot-load-size", "4", "-o", str(self.iso), str(iso_root)], check=True,
                       stderr=subprocess.DEVNULL)
        self.tftp.mkdir(exist_ok=True)
        (self.tftp / self.pxe_file).write_bytes(boot_program("MARKER-PXE", work))
        shutil.rmtree(work)
        return self

    def qemu_args(self, *, disk: bool = True, nic: bool = True, memory: int = 64) -> list[str]:
        """A q35 TCG machine booting from the disk, with a PXE-capable NIC on slirp's TFTP."""
        args = ["-machine", "q35", "-accel", "tcg", "-m", str(memory), "-display", "none", "-nodefaults",
                "-vga", "none"]
        if disk:
            args += ["-drive", f"if=none,id=hd0,file={self.disk},format=raw,snapshot=on",
                     "-device", "ide-hd,drive=hd0,id=disk0,bootindex=1"]
        if nic:
            args += ["-netdev", f"user,id=net0,tftp={self.tftp},bootfile={self.pxe_file}",
                     "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56"]
        return args

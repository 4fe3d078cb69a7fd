"""Tiny bootable test guests, built at test time: disk images, an ISO and PXE boot files, for
SeaBIOS and for OVMF (UEFI).

For SeaBIOS each runs the same 16-bit boot program (loaded at 0:7C00 by the BIOS from a disk's
MBR, from an El Torito no-emulation CD, or by iPXE as a PXE NBP), which:

* prints its marker (``MARKER-HDD``, ``MARKER-CD``, ``MARKER-PXE``) on COM1;
* prints ``NMI`` from its NMI handler, so an injected NMI is visible;
* (the installer ISO only) reboots the machine itself about 3 s later, as an installer or a
  deploy ramdisk does (keyboard controller reset: a guest-initiated reset);
* enables the ACPI power button event (PM1_EN at PMBASE+2, PMBASE 0x600 on q35) and, when the
  button is pressed (``system_powerdown``), prints ``POWER-BUTTON`` and enters S5 through PM1_CNT,
  as an ACPI-aware OS does: a real guest for soft power-off.

For OVMF, a minimal UEFI application (a PE32+ image written out by hand in nasm) prints its
marker on COM1 and halts; it is ``\\EFI\\BOOT\\BOOTX64.EFI`` on a FAT disk, the EFI El Torito
image of the same ISO, and the PXE boot file ``bootx64.efi``.
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
    mov dx, PMBASE+2            ; the power button armed before the marker: seen the marker, a
    mov ax, 0x0100              ; press is never lost (QEMU drops a press while PWRBTN_EN is clear)
    out dx, ax
    mov si, marker
    call print
%%if %(reboot)d
    sti
    mov ebx, [0x46c]
wait_ticks:
    hlt
    mov eax, [0x46c]
    sub eax, ebx
    cmp eax, 55
    jb wait_ticks
    mov al, 0xfe
    out 0x64, al
    jmp $
%%endif
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


UEFI_APPLICATION = r"""
bits 64
default rel
org 0
    dw "MZ"                     ; DOS header: only the magic and e_lfanew matter
    times 0x3a db 0
    dd pe
pe:
    db "PE", 0, 0
    dw 0x8664                   ; x86-64
    dw 1                        ; one section
    dd 0, 0, 0
    dw optional_end - optional
    dw 0x0206                   ; executable; no line numbers, no debug info (relocations not stripped)
optional:
    dw 0x20b                    ; PE32+
    db 0, 0
    dd 0x200, 0, 0              ; size of code, of data, of bss
    dd 0x1000                   ; entry point (RVA)
    dd 0x1000                   ; base of code
    dq 0x400000                 ; image base (the code is position-independent, no relocations)
    dd 0x1000, 0x200            ; section and file alignment
    dw 0, 0, 0, 0, 0, 0
    dd 0
    dd 0x2000                   ; size of image
    dd 0x200                    ; size of headers
    dd 0
    dw 10                       ; subsystem: EFI application
    dw 0
    dq 0x10000, 0x1000, 0x10000, 0x1000
    dd 0
    dd 16                       ; data directories, all empty
    times 16 dq 0
optional_end:
    db ".text", 0, 0, 0
    dd 0x1000, 0x1000           ; virtual size and address
    dd 0x200, 0x200             ; raw size and file offset
    dd 0, 0
    dw 0, 0
    dd 0x60000020               ; code, execute, read
    times 0x200 - ($ - $$) db 0
    lea rsi, [rel message]
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .idle
    out dx, al
    jmp .next
.idle:
    hlt
    jmp .idle
message: db 13, 10, "%(marker)s", 13, 10, 0
    times 0x400 - ($ - $$) db 0
"""


MULTIBOOT_KERNEL = r"""
; A kernel for QEMU's -kernel (direct boot, Multiboot with the a.out kludge: a flat binary
; loaded at 1 MiB): prints its marker on COM1 and halts.
bits 32
org 0x100000
header:
    dd 0x1BADB002               ; magic
    dd 0x00010000               ; flags: the address fields below are valid
    dd -(0x1BADB002 + 0x00010000)
    dd header                   ; header_addr
    dd header                   ; load_addr
    dd end                      ; load_end_addr
    dd end                      ; bss_end_addr
    dd start                    ; entry_addr
start:
    mov esi, message
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .idle
    out dx, al
    jmp .next
.idle:
    hlt
    jmp .idle
message: db "%(marker)s", 13, 10, 0
end:
"""


def assemble(source_text: str, name: str, workdir: Path) -> bytes:
    source = workdir / f"{name}.asm"
    source.write_text(source_text)
    output = workdir / f"{name}.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(output), str(source)], check=True)
    return output.read_bytes()


def boot_program(marker: str, workdir: Path, reboot: bool = False) -> bytes:
    return assemble(BOOT_PROGRAM % {"marker": marker, "reboot": int(reboot)}, marker, workdir)


def uefi_application(marker: str, workdir: Path) -> bytes:
    return assemble(UEFI_APPLICATION % {"marker": marker}, f"{marker}-uefi", workdir)


def efi_boot_image(path: Path, application: bytes, size_kib: int, workdir: Path) -> None:
    """A FAT file system (no partition table, made with mtools) holding \\EFI\\BOOT\\BOOTX64.EFI."""
    path.write_bytes(bytes(size_kib * 1024))
    local = workdir / "BOOTX64.EFI"
    local.write_bytes(application)
    for command in (["mformat", "-i", str(path), "::"], ["mmd", "-i", str(path), "::/EFI", "::/EFI/BOOT"],
                    ["mcopy", "-i", str(path), str(local), "::/EFI/BOOT/BOOTX64.EFI"]):
        subprocess.run(command, check=True, capture_output=True)


def make_iso(path: Path, bios_program: bytes, uefi_program: bytes | None, root: Path) -> None:
    """An ISO 9660 image with El Torito no-emulation boot entries for BIOS and, if given, UEFI."""
    root.mkdir()
    (root / "boot.img").write_bytes(bios_program.ljust(2048, b"\0"))
    boot_entries = ["-b", "boot.img", "-no-emul-boot", "-boot-load-size", "4"]
    if uefi_program is not None:
        efi_boot_image(root / "efiboot.img", uefi_program, 1440, root.parent)
        boot_entries += ["-eltorito-alt-boot", "-e", "efiboot.img", "-no-emul-boot"]
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", *boot_entries, "-o", str(path), str(root)], check=True,
                   stderr=subprocess.DEVNULL)


OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


class GuestImages:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.disk = directory / "disk.img"
        self.iso = directory / "cd.iso"
        self.installer_iso = directory / "installer.iso"
        self.uefi_disk = directory / "uefi-disk.img"
        self.tftp = directory / "tftp"
        self.pxe_file = "boot.pxe"
        self.uefi_pxe_file = "bootx64.efi"
        self.mode_iso = directory / "mode.iso"
        """Boots in both modes, saying which: MARKER-LEGACY (BIOS El Torito) or MARKER-UEFI (EFI)."""
        self.kernel = directory / "kernel.bin"
        """A direct-boot kernel (``-kernel``) that prints MARKER-KERNEL."""

    def build(self) -> GuestImages:
        work = self.directory / "build"
        work.mkdir(parents=True, exist_ok=True)
        self.disk.write_bytes(boot_program("MARKER-HDD", work).ljust(1024 * 1024, b"\0"))
        efi_boot_image(self.uefi_disk, uefi_application("MARKER-HDD", work), 4096, work)
        make_iso(self.iso, boot_program("MARKER-CD", work), uefi_application("MARKER-CD", work), work / "iso")
        make_iso(self.installer_iso, boot_program("MARKER-INSTALLER", work, reboot=True), None, work / "installer")
        make_iso(self.mode_iso, boot_program("MARKER-LEGACY", work), uefi_application("MARKER-UEFI", work),
                 work / "mode")
        self.tftp.mkdir(exist_ok=True)
        (self.tftp / self.pxe_file).write_bytes(boot_program("MARKER-PXE", work))
        (self.tftp / self.uefi_pxe_file).write_bytes(uefi_application("MARKER-PXE", work))
        self.kernel.write_bytes(assemble(MULTIBOOT_KERNEL % {"marker": "MARKER-KERNEL"}, "kernel", work))
        shutil.rmtree(work)
        return self

    def qemu_args(self, *, disk: bool = True, nic: bool = True, memory: int = 64, uefi: bool = False,
                  kernel: bool = False) -> list[str]:
        """A q35 TCG machine booting from the disk, with a PXE-capable NIC on slirp's TFTP;
        SeaBIOS, or OVMF with ``uefi`` (its variables in a throw-away snapshot); with ``kernel``,
        direct-booting MARKER-KERNEL (``-kernel``) before any device."""
        args = ["-machine", "q35", "-accel", "tcg", "-m", str(128 if uefi else memory), "-display", "none",
                "-nodefaults", "-vga", "none"]
        if kernel:
            args += ["-kernel", str(self.kernel)]
        if uefi:
            args += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,snapshot=on,file={OVMF_VARS}"]
        if disk:
            args += ["-drive", f"if=none,id=hd0,file={self.uefi_disk if uefi else self.disk},format=raw,snapshot=on",
                     "-device", "ide-hd,drive=hd0,id=disk0,bootindex=1"]
        if nic:
            bootfile = self.uefi_pxe_file if uefi else self.pxe_file
            args += ["-netdev", f"user,id=net0,tftp={self.tftp},bootfile={bootfile}",
                     "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56"]
        return args


#: A boot sector that hides the text cursor (the screen then stays still), prints KVM-READY on the
#: screen and COM1, then echoes every key the BIOS reads (int 16h) to both.
#: The start of a boot sector: segments and the stack set.
BOOT_SECTOR_START = r"""
bits 16
org 0x7c00
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
"""

#: The start of a boot sector that draws on the text screen: the cursor hidden too.
SCREEN_BOOT_SECTOR_START = BOOT_SECTOR_START + r"""
    mov ah, 0x01
    mov cx, 0x2000              ; no cursor
    int 0x10
"""

KEY_GUEST = SCREEN_BOOT_SECTOR_START + r"""
    mov si, ready
.print:
    lodsb
    test al, al
    jz keys
    call putc
    jmp .print
keys:
    xor ah, ah
    int 0x16                    ; al: the key's ASCII code (0 or 0xE0: a key with none)
    test al, al
    jz keys
    cmp al, 0xe0
    je keys
    call putc
    jmp keys
putc:
    mov dx, 0x3f8
    out dx, al
    mov ah, 0x0e
    mov bx, 0x0007
    int 0x10
    ret
ready: db "KVM-READY", 13, 10, 0
times 510-($-$$) db 0
dw 0xaa55
"""
KEY_GUEST_READY = "KVM-READY"


def boot_sector_vm(disk: Path) -> str:
    """The ``cmd`` and ``autostart`` lines of a ``[vm.NAME]`` table whose QEMU boots ``disk`` (a
    boot-sector guest's) as soon as the machine service starts."""
    return (f'cmd = ["-machine", "q35", "-accel", "tcg", "-m", "64", "-drive", '
            f'"file={disk},format=raw,if=ide,snapshot=on"]\nautostart = true\n')


def key_echo_disk(directory: Path, name: str = "keys") -> Path:
    """KEY_GUEST on a 1 MiB raw disk image (``name``.img in ``directory``)."""
    disk = directory / f"{name}.img"
    disk.write_bytes(assemble(KEY_GUEST, name, directory).ljust(1 << 20, b"\0"))
    return disk


#: A boot sector that puts the screen in VBE mode 0x118 (1024x768, 24 bits per pixel: 36 banks of
#: 64 KiB at A000:0000) and fills it with noise (xorshift16), so that its PNG screenshot is larger
#: than one bus message; then prints NOISE-READY on COM1 and halts.
NOISE_GUEST_READY = "NOISE-READY"
NOISE_GUEST = BOOT_SECTOR_START + r"""
    mov ax, 0x4f02
    mov bx, 0x0118              ; 1024x768x24, banked
    int 0x10
    mov ax, 0xa000
    mov es, ax
    mov bp, 0xace1              ; the noise's state
    xor dx, dx                  ; the bank
bank:
    push dx
    mov ax, 0x4f05              ; set window A's bank to dx
    xor bx, bx
    int 0x10
    pop dx
    xor di, di
pixel:
    mov ax, bp                  ; xorshift16: x ^= x << 7; x ^= x >> 9; x ^= x << 8
    shl ax, 7
    xor bp, ax
    mov ax, bp
    shr ax, 9
    xor bp, ax
    mov ax, bp
    shl ax, 8
    xor bp, ax
    mov ax, bp
    stosb
    test di, di
    jnz pixel
    inc dx
    cmp dx, 36
    jb bank
    mov si, ready
    mov dx, 0x3f8
.print:
    lodsb
    test al, al
    jz .idle
    out dx, al
    jmp .print
.idle:
    hlt
    jmp .idle
ready: db 13, 10, "NOISE-READY", 13, 10, 0
    times 510 - ($ - $$) db 0
    dw 0xaa55
"""


def noise_disk(directory: Path, name: str = "noise") -> Path:
    """NOISE_GUEST on a 1 MiB raw disk image (``name``.img in ``directory``)."""
    disk = directory / f"{name}.img"
    disk.write_bytes(assemble(NOISE_GUEST, name, directory).ljust(1 << 20, b"\0"))
    return disk

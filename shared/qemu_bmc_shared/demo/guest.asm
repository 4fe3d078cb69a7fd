; The demo machine's guest: a 512-byte boot sector (SeaBIOS loads it at 0:7C00) that shows
; something on the serial console and on the screen at once.
;
; * prints a banner and a login-like prompt on COM1 (port 0x3F8, polling the line status
;   register) and on the screen (BIOS int 10h teletype);
; * echoes what it reads from COM1; Enter (CR, or LF not after a CR) prints the banner and the
;   prompt again, so a console opened later shows them after one Enter;
; * obeys the ACPI power button (PM1_EN/PM1_STS at PMBASE 0x600 on q35, S5 through PM1_CNT), so
;   a graceful power-off works;
; * halts between timer ticks (a guest that spins takes a whole host core under TCG).
;
; Assembled with `nasm -f bin -o guest.img guest.asm`; tests/test_demo.py checks that the shipped
; guest.img is exactly what this source gives.

bits 16
org 0x7c00

COM1    equ 0x3f8
LSR     equ COM1 + 5                ; line status: bit 0 data ready, bit 5 transmitter empty
PMBASE  equ 0x600
CR      equ 13
LF      equ 10

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    jmp 0:main
main:
    mov dx, COM1 + 3                ; 8 data bits, no parity, one stop bit, divisor 1 (115200)
    mov al, 0x83
    out dx, al
    mov dx, COM1
    mov al, 1
    out dx, al
    inc dx
    xor al, al
    out dx, al                      ; divisor high byte; COM1+1 is the interrupt enable then: none
    mov dx, COM1 + 3
    mov al, 0x03
    out dx, al
    mov dx, COM1 + 2                ; FIFOs on and cleared
    mov al, 0x07
    out dx, al
    mov dx, COM1 + 4                ; DTR, RTS
    mov al, 0x03
    out dx, al
    mov dx, PMBASE + 2              ; PM1_EN: the power button
    mov ax, 0x0100
    out dx, ax
    sti
    xor bl, bl                      ; the last character read
banner:
    mov si, text
.next:
    lodsb
    test al, al
    jz idle
    call put
    jmp .next
idle:
    hlt                             ; until the next interrupt (the timer's, 18.2 per second)
    mov dx, PMBASE                  ; PM1_STS: the power button pressed?
    in ax, dx
    test ax, 0x0100
    jnz power_off
read:
    mov dx, LSR
    in al, dx
    test al, 1
    jz idle
    mov dx, COM1
    in al, dx
    mov bh, bl
    mov bl, al
    cmp al, CR
    je banner
    cmp al, LF
    jne .echo
    cmp bh, CR
    jne banner
    jmp read
.echo:
    call put
    jmp read
power_off:
    mov dx, PMBASE + 4              ; PM1_CNT: SLP_EN with SLP_TYP 0, S5 on QEMU's ICH9
    mov ax, 0x2000
    out dx, ax
    jmp idle

; put: the character in AL on COM1 and on the screen (keeps BX)
put:
    push bx
    push ax
    mov dx, LSR
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop ax
    mov dx, COM1
    out dx, al
    mov ah, 0x0e
    mov bx, 0x0007
    int 0x10
    pop bx
    ret

text:
    db CR, LF, "qemu-bmc demo - node1", CR, LF
    db "A 512-byte guest: it echoes what you type; Enter shows this again.", CR, LF
    db CR, LF, "node1 login: ", 0

times 510-($-$$) db 0
dw 0xaa55

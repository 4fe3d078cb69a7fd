"""qemu-bmc VM-wire service: in-band IPMI from the guest through QEMU's ipmi-bmc-extern device."""

__version__ = "0.1.0"

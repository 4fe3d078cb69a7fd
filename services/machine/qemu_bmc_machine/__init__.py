"""qemu-bmc machine service: owns each VM's QEMU process and QMP socket."""

__version__ = "0.1.0"

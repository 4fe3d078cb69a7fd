"""qemu-bmc command line: the one-machine launcher (`qemu-bmc up`) and bus clients."""

__version__ = "0.1.0"

"""qemu-bmc IPMI over LAN service: RMCP, RMCP+ (IPMI 2.0) and IPMI 1.5 sessions on UDP."""

__version__ = "0.1.0"

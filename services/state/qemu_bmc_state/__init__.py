"""qemu-bmc state service: each machine's BMC configuration, persisted in JetStream KV."""

__version__ = "0.1.0"

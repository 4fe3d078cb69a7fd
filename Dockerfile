# One image for every qemu-bmc service; compose.yaml picks the command.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv qemu-system-x86 qemu-block-extra ovmf \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qemu-bmc
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY cli cli
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH \
    QEMU_BMC_CONFIG=/etc/qemu-bmc/config.toml \
    QEMU_BMC_RUNTIME_DIR=/var/lib/qemu-bmc
CMD ["qemu-bmc", "--help"]

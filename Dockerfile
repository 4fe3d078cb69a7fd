# One image for every qemu-bmc service; compose.yaml picks the command (and builds it once).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv qemu-system-x86 qemu-block-extra ovmf iproute2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qemu-bmc
# the dependencies, pinned with their hashes (requirements.lock), in a layer of their own
COPY requirements.lock ./
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY cli cli
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . && rm -rf build
ENV PATH=/opt/venv/bin:$PATH \
    QEMU_BMC_CONFIG=/etc/qemu-bmc/config.toml \
    QEMU_BMC_RUNTIME_DIR=/var/lib/qemu-bmc
CMD ["qemu-bmc", "--help"]

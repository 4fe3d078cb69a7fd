# One image for every qemu-bmc service; compose.yaml picks the command (and builds it once).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv qemu-system-x86 qemu-block-extra ovmf iproute2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/qemu-bmc
# the dependencies, pinned with their hashes (requirements.lock), in a layer of their own. Behind a
# TLS-intercepting proxy, hand pip its CA bundle as a build secret (BuildKit; never stored in the
# image): docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
COPY requirements.lock ./
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY cli cli
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps . && rm -rf build
ENV PATH=/opt/venv/bin:$PATH \
    QEMU_BMC_CONFIG=/etc/qemu-bmc/config.toml \
    QEMU_BMC_RUNTIME_DIR=/var/lib/qemu-bmc
CMD ["qemu-bmc", "--help"]

# One image for every qemu-bmc service; compose.yaml picks the command (and builds it once).
# Built with BuildKit (RUN --mount). Behind a TLS-intercepting proxy, hand pip its CA bundle as a
# build secret, never stored in the image:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t qemu-bmc .

# The virtual environment, made in a stage of its own: the image gets it without pip and setuptools.
FROM debian:bookworm-slim AS venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv
WORKDIR /opt/qemu-bmc
# the dependencies, pinned with their hashes (requirements.lock), in a layer of their own
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
 && /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/pip uninstall -y -q pip setuptools

FROM debian:bookworm-slim
# QEMU's curl block driver (virtual media from an HTTP URL) is taken alone from qemu-block-extra,
# of QEMU's own version: the package's other drivers (Ceph, GlusterFS, iSCSI, NFS) would add 100 MB.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 qemu-system-x86 ovmf iproute2 libcurl3-gnutls \
 && cd /tmp \
 && apt-get download "qemu-block-extra=$(dpkg-query -W -f '${Version}' qemu-system-common)" \
 && dpkg-deb --fsys-tarfile qemu-block-extra_*.deb \
    | tar -x -C / --wildcards './usr/lib/*/qemu/block-curl.so' \
 && rm -f qemu-block-extra_*.deb \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    QEMU_BMC_CONFIG=/etc/qemu-bmc/config.toml \
    QEMU_BMC_RUNTIME_DIR=/var/lib/qemu-bmc
CMD ["qemu-bmc", "--help"]

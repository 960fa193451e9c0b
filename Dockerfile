# mcp-python-interpreter: the MCP server over streamable HTTP on 0.0.0.0:8000,
# its kernels' Python environment provisioned at build time, run as a
# non-root user, sessions in the volume /data.
#
#   docker build -t mcp-python-interpreter .
#   docker run -d -p 127.0.0.1:8000:8000 -v mcp-data:/data \
#       -e MCP_AUTH_TOKEN="$(openssl rand -hex 32)" mcp-python-interpreter
#
# Stages: `build` compiles the release binary (rust:bookworm); `runtime` is
# debian:bookworm-slim with Python 3.11, the binary and the kernel
# environment. Without a registry (scripts/container-test), the binary is
# built on a Debian bookworm host and taken from the build context instead:
#   --build-arg BINARY_FROM=context --build-arg RUNTIME_IMAGE=<local image> --pull=never
#
# Behind a proxy that re-signs HTTPS: its CA certificates in
# /usr/local/share/ca-certificates at build time (podman/buildah:
# `-v /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro`)
# are used by apt and pip during the build and not kept in the image.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# `build` (compile here) or `context` (target/release/mcp-python-interpreter
# from the build context).
ARG BINARY_FROM=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock kernel-requirements.txt ./
COPY src ./src
RUN cargo build --release --locked \
 && install -D -m 0755 target/release/mcp-python-interpreter /out/mcp-python-interpreter

FROM scratch AS context
COPY target/release/mcp-python-interpreter /out/mcp-python-interpreter

FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_IMAGE} AS runtime
# The MCP registry checks that an image names its server.json entry (there,
# replace OWNER with the account the image is published under).
ARG MCP_SERVER_NAME=io.github.OWNER/mcp-python-interpreter
LABEL io.modelcontextprotocol.server.name="${MCP_SERVER_NAME}" \
      org.opencontainers.image.title="mcp-python-interpreter" \
      org.opencontainers.image.description="A stateful, sandboxed Python interpreter (Jupyter kernels) served over MCP" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# python3-venv: the kernels' environment is a venv; tini: PID 1 that reaps
# whatever a kernel leaves behind; ca-certificates: HTTPS for `!pip install`.
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/mcp --shell /usr/sbin/nologin mcp \
 && mkdir -p /data/sessions \
 && chown -R mcp:mcp /data \
 && chmod 0700 /data
COPY --from=binary /out/mcp-python-interpreter /usr/local/bin/mcp-python-interpreter
COPY docker/entrypoint.sh /usr/local/bin/mcp-python-interpreter-entrypoint

# The kernel environment, read-only for the server and its kernels. pip
# trusts the system bundle plus any CA mounted for the build (see above);
# that merged bundle lives in /tmp for this step only.
ENV MCP_ENVS_DIR=/opt/mcp-python-interpreter
RUN bundle=/tmp/build-ca.pem \
 && cat /etc/ssl/certs/ca-certificates.crt > "$bundle" \
 && for c in /usr/local/share/ca-certificates/*.crt; do [ -f "$c" ] && cat "$c" >> "$bundle"; done; \
    PIP_CERT="$bundle" PIP_NO_CACHE_DIR=1 mcp-python-interpreter --provision-only \
 && rm -f "$bundle" \
 && chmod -R a+rX,go-w "$MCP_ENVS_DIR"

ENV MCP_TRANSPORT=http \
    MCP_HOST=0.0.0.0 \
    MCP_PORT=8000 \
    MCP_DATA_DIR=/data/sessions \
    HOME=/home/mcp
USER mcp
WORKDIR /home/mcp
VOLUME ["/data"]
EXPOSE 8000
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/mcp-python-interpreter-entrypoint"]
CMD []

# flotilla-node:dev — a node that can host MCP servers from PyPI: Debian bookworm (built
# here with mmdebstrap, no registry) with python3 and a virtualenv the node's user owns, so
# `pip install mcp-server-time` works inside the container.
FROM flotilla-debian:bookworm
RUN python3 -m venv /opt/mcp && mkdir -p /data && chown -R 65532:65532 /opt/mcp /data
ENV PATH=/opt/mcp/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp
COPY flotilla /flotilla
USER 65532:65532
ENTRYPOINT ["/flotilla"]

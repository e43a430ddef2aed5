# flotilla:dev — the statically linked flotilla binary alone (FROM scratch: no shell, no
# libc, nothing to patch). It runs any role: hub, node without Python MCP servers, CLI.
# /data belongs to the non-root user, so a docker named volume mounted there (which takes
# the directory's owner) is writable; on Kubernetes the chart uses a directory inside it.
FROM scratch
COPY flotilla /flotilla
COPY --chown=65532:65532 data/ /data/
USER 65532:65532
ENTRYPOINT ["/flotilla"]

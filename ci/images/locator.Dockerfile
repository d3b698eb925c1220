# The locator image: the release binary and exactly the shared libraries it links, nothing else
# (no shell, no package manager). Built by `ci/build-images.sh --component locator VERSION`:
#   rootfs/   the binary at /locator plus every library `ldd` lists, at its own path
#   data/     an empty directory, so a fresh named volume mounted at /data is writable by 65532
# No HEALTHCHECK: the locator has no `health` subcommand and the image has no shell or HTTP
# client, so its health is watched from outside through GET /healthz (port 7070, no token).
FROM scratch
ARG VERSION
COPY rootfs/ /
COPY --chown=65532:65532 data/ /data/
LABEL org.opencontainers.image.title="haddock-locator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="haddock/locator"
USER 65532:65532
EXPOSE 7070
VOLUME ["/data"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/locator"]
# Embedded store in /data (a generated deploy token is kept there too when none is given).
# With LOCATOR_DATABASE_URL=postgres://… set, the PostgreSQL store is used instead.
CMD ["--log-format", "json", "serve", "--listen", "0.0.0.0:7070", "--data-dir", "/data"]

# The proxy image: the release binary and exactly the shared libraries it links, nothing else
# (no shell, no package manager). Built by `ci/build-images.sh --component proxy VERSION`:
#   rootfs/   the binary at /proxy plus every library `ldd` lists, at its own path
#   state/    an empty directory, so a fresh named volume mounted at /state is writable by 65532
# No HEALTHCHECK: the proxy has no `health` subcommand and the image has no shell or HTTP
# client, so its health is watched from outside through the admin port's GET /healthz (9180).
FROM scratch
ARG VERSION
COPY rootfs/ /
COPY --chown=65532:65532 state/ /state/
LABEL org.opencontainers.image.title="haddock-proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="haddock/proxy"
USER 65532:65532
# 8080: user traffic; 9180: admin (/healthz, /metrics, /routing).
EXPOSE 8080 9180
VOLUME ["/state"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/proxy"]
# --service has no default: give the whole command, e.g.
#   --log-format json serve --listen 0.0.0.0:8080 --admin 0.0.0.0:9180 --state-dir /state --service optimizer
# with HADDOCK_LOCATOR_URL, HADDOCK_PROXY_TOKEN and HADDOCK_COOKIE_KEY in the environment.
CMD ["serve", "--help"]

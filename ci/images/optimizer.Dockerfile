# The optimizer image: the release binary and exactly the shared libraries it links, nothing
# else (no shell, no package manager). Built by ci/build-images.sh from a prepared context:
#   rootfs/   the binary at /optimizer plus every library `ldd` lists, at its own path
#   cache/    an empty directory, so a fresh named volume mounted at /cache is writable by 65532
FROM scratch
ARG VERSION
COPY rootfs/ /
COPY --chown=65532:65532 cache/ /cache/
# The tag is baked in here, so one binary serves any number of tags and /version tells them apart.
ENV OPTIMIZER_VERSION=${VERSION} \
    OPTIMIZER_LISTEN=0.0.0.0:8080 \
    OPTIMIZER_CACHE=/cache
LABEL org.opencontainers.image.title="haddock-optimizer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="haddock/optimizer"
USER 65532:65532
EXPOSE 8080
VOLUME ["/cache"]
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 CMD ["/optimizer", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/optimizer"]
CMD ["serve"]

# The DNS cache accessory: Debian's dnsmasq and exactly the shared libraries it links, nothing
# else (no shell, no package manager). Built by ci/build-images.sh --component dnsmasq from:
#   rootfs/   /dnsmasq plus every library `ldd` lists, and /etc/{passwd,group,nsswitch.conf}
#             naming the unprivileged user dnsmasq switches to once it has bound port 53
FROM scratch
ARG VERSION
ARG UPSTREAM
COPY rootfs/ /
LABEL org.opencontainers.image.title="haddock-dnsmasq" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="dnsmasq ${UPSTREAM} (Debian) as a DNS cache"
EXPOSE 53/udp 53/tcp
STOPSIGNAL SIGTERM
# Root only to bind port 53: dnsmasq then runs as nobody. In the foreground, logging to stderr
# (docker logs), no pid file (nothing to write it to). SIGUSR1 writes its cache statistics
# (queries forwarded, answered locally) to the log.
ENTRYPOINT ["/dnsmasq", "--keep-in-foreground", "--log-facility=-", "--pid-file=", "--user=nobody", "--group=nogroup"]
CMD ["--cache-size=1000"]

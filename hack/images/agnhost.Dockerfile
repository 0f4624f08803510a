# agnhost as the e2e framework runs it: the binary at /agnhost, with the tools its
# subcommands and the tests call (curl, dig, nc, ip, iperf, bash), CoreDNS at /coredns, the
# porter's test certificate, /uploads, and the user and group the tests look for.
ARG BASE
FROM ${BASE}
COPY agnhost coredns localhost.crt localhost.key /
RUN ln -s agnhost /agnhost-2 && mkdir /uploads \
    && groupadd -g 50000 group-defined-in-image \
    && useradd -u 1000 -M -N -G group-defined-in-image user-defined-in-image
EXPOSE 80 8080 8081 9376 5000
ENTRYPOINT ["/agnhost"]
CMD ["pause"]

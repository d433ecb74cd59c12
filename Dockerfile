# dinv: Docker in a microVM. Runtime image: one process, `dinv`, needing only /dev/kvm.
#
#   docker build -t dinv .
#   docker run -d --name dinv --device /dev/kvm -v dinv-docker:/docker dinv
#   docker exec dinv docker ps          # the docker CLI inside talks to dockerd in the microVM
#
# The build stages run the same scripts CI runs (one recipe): cargo for `dinv`,
# guest-image/kernel/build.sh for the guest kernel, guest-image/rootfs/build.sh for the docker
# root filesystem (debootstrap + chroot: the build needs root, which `docker build` has).
# Volumes: /docker (the docker disk image: images, containers), /volume (DINV_VOLUME_* image),
# /certs (TLS certificates, generated on first start with --tls/--tlsverify), /snapshot (the
# booted guest, saved by the first start with a new docker disk; later such starts resume it).

FROM rust:1-bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive DINV_CACHE=/cache CARGO_TARGET_DIR=/target
WORKDIR /src
# Build dependencies: the same package lists scripts/setup installs.
COPY guest-image/apt-packages.txt /tmp/apt/guest-image.txt
COPY guest-image/rootfs/apt-packages.txt /tmp/apt/rootfs.txt
RUN sed 's/#.*//' /tmp/apt/*.txt | awk 'NF' | sort -u > /tmp/apt/all \
    && apt-get update -q \
    && xargs -a /tmp/apt/all apt-get install -y -q --no-install-recommends \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY boot boot
COPY devices devices
COPY vmm vmm
COPY netstack netstack
COPY p9 p9
COPY tests tests
COPY benches benches
COPY guest-image guest-image
RUN cargo build --release --locked -p dinv-vmm --bin dinv \
    && install -D -m 0755 /target/release/dinv /out/usr/bin/dinv
RUN kernel_dir=$(guest-image/kernel/build.sh | tail -n 1) \
    && install -D -m 0644 "$kernel_dir/vmlinux" /out/usr/lib/dinv/vmlinux
RUN rootfs=$(guest-image/rootfs/build.sh | tail -n 1) \
    && install -D -m 0644 "$rootfs" /out/usr/lib/dinv/rootfs.ext4

FROM debian:trixie-slim
ENV DEBIAN_FRONTEND=noninteractive DINV_SNAPSHOT=/snapshot
# docker-cli: so `docker exec <name> docker ps` works; e2fsprogs: fsck of the disks by hand.
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends docker-cli e2fsprogs ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
VOLUME ["/docker", "/volume", "/certs", "/snapshot"]
# 2375/2376: the docker API over TCP with --tcp / --tls(verify).
EXPOSE 2375 2376
# Guest boot takes seconds on hardware KVM (minutes on PVM hosts): allow a long start period.
HEALTHCHECK --interval=15s --timeout=15s --start-period=30m --retries=3 CMD ["dinv", "health"]
STOPSIGNAL SIGTERM
CMD ["dinv"]

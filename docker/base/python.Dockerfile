# Python 3.11 from Debian's packages, for hosts that cannot pull python:3.11-slim. Built by
# docker/base-images.sh FROM its debootstrapped image; the CPU image takes it as BASE_IMAGE.
ARG BASE_IMAGE=idverify-base/debian:bookworm
FROM ${BASE_IMAGE}
# CAs the building host adds to Debian's bundle (base-images.sh copies them in; may be empty)
COPY ca/ /usr/local/share/ca-certificates/
# Debian package pins break on every point release; the base image is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv \
    && update-ca-certificates \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python3 \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python \
    && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
CMD ["python3"]

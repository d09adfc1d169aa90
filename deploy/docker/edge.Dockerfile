# syntax=docker/dockerfile:1
# kas-edge container image. The build context is the REPOSITORY ROOT:
#   docker build -f deploy/docker/edge.Dockerfile -t kas-edge:0.1.0 .
# (edge.Dockerfile.dockerignore next to this file keeps target/, .git/ and .dev/ out of the
# context; BuildKit reads it instead of a root .dockerignore.)

FROM rust:1-bookworm AS build
# pingora's zlib-ng build needs cmake; protobufs are compiled with protox (no protoc).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Without the `dev` feature: the production binary links no kas server or GitLab stand-in.
RUN cargo build --release --locked -p kas-edge --no-default-features \
    && install -m 0755 target/release/kas-edge /usr/local/bin/kas-edge

FROM debian:bookworm-slim
# ca-certificates for outbound TLS (ACME directory). The image keeps coreutils on purpose:
# the Deployment's preStop hook runs `sleep`.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/kas-edge /usr/local/bin/kas-edge
# Non-root; numeric so Kubernetes can enforce runAsNonRoot.
USER 65532:65532
# https, http (redirects, ACME HTTP-01), admin (/healthz /readyz /metrics). Unprivileged
# ports: no NET_BIND_SERVICE capability needed.
EXPOSE 8443 8080 8081
ENTRYPOINT ["/usr/local/bin/kas-edge"]
CMD ["run", "--config", "/etc/kas-edge/edge.toml"]

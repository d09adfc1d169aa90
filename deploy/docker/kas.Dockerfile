# syntax=docker/dockerfile:1
# kas container image. The build context is the REPOSITORY ROOT:
#   docker build -f deploy/docker/kas.Dockerfile -t kas:0.1.0 .
# (kas.Dockerfile.dockerignore next to this file keeps target/, .git/ and .dev/ out of the
# context; BuildKit reads it instead of a root .dockerignore.)

FROM rust:1-bookworm AS build
# Same builder as edge.Dockerfile (cmake is what pingora's zlib-ng needs; `-p kas` does
# not build pingora, but one builder recipe for both images keeps them in step).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kas --no-default-features \
    && install -m 0755 target/release/kas /usr/local/bin/kas

FROM debian:bookworm-slim
# ca-certificates for TLS to GitLab's API.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/kas /usr/local/bin/kas
# Non-root; numeric so Kubernetes can enforce runAsNonRoot.
USER 65532:65532
# agent (gRPC and websocket), observability (/liveness /readiness /metrics).
EXPOSE 8150 8151
ENTRYPOINT ["/usr/local/bin/kas"]
CMD ["--config", "/etc/kas/kas.toml"]

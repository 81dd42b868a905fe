# keycap's three binaries (keycap-control, keycap-proxy, keycap) in one
# small image; docker-compose.yml runs each with its own command.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/keycap-control target/release/keycap-proxy target/release/keycap /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 keycap \
 && mkdir -p /var/lib/keycap \
 && chown keycap /var/lib/keycap
COPY --from=build /out/ /usr/local/bin/
USER keycap
ENV KEYCAP_LOG=info

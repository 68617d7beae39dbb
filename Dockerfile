# pgrelay for docker-compose.yml: built with cargo, run on slim Debian with the Postgres 15
# client tools (row- and statement-mode bootstrap runs pg_dump and psql).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# src/routing/functions.rs includes sql/writing_functions.sql at compile time.
COPY sql ./sql
RUN cargo build --release --locked --bin pgrelay

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client-15 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
USER nobody
EXPOSE 6432 9930
ENTRYPOINT ["pgrelay"]
CMD ["run", "--config", "/etc/pgrelay/pgrelay.toml"]

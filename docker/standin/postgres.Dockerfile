# Stand-in for postgres:16-bookworm: Debian bookworm's PostgreSQL 15 with the part of the official
# image's contract docker-compose.yml uses: POSTGRES_USER/_PASSWORD/_DB create the cluster at the
# first start, password (scram) authentication over TCP, pg_isready on PATH.
FROM xatl-standin/bookworm:base
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint.sh"]

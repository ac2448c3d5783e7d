# Stand-in for redis:7.4-bookworm: Debian bookworm's Redis 7.0, run as `redis` in /data as the image does.
FROM xatl-standin/bookworm:base
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* && mkdir /data && chown redis:redis /data
USER redis
WORKDIR /data
VOLUME /data
EXPOSE 6379
CMD ["redis-server"]

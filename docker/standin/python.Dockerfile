# Stand-in for python:3.11-slim-bookworm: Debian bookworm's own Python 3.11 where the image has it.
FROM xatl-standin/bookworm:base
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python && ln -s /usr/bin/python3 /usr/local/bin/python3
CMD ["python3"]

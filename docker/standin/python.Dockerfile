# Stand-in for python:3.11-slim-bookworm: Debian bookworm's own Python 3.11 where the image has it,
# and this machine's CA bundle (its way out to PyPI presents certificates of its own CA).
FROM xatl-standin/bookworm:base
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python && ln -s /usr/bin/python3 /usr/local/bin/python3
COPY host-ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt
CMD ["python3"]

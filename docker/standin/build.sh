#!/usr/bin/env bash
# Stand-ins for the base images docker-compose.yml and docker/Dockerfile name, on a machine that can
# reach Debian's mirror but no image registry: a Debian bookworm made with debootstrap and imported,
# then Debian's Python, Redis and PostgreSQL on it, tagged with the official images' names.
# Run as root beside a running dockerd:  docker/standin/build.sh   (about 5 minutes; docs/deploy.md)
set -euo pipefail
cd "$(dirname "$0")"
root=$(mktemp -d)
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
tar -C "$root" -c . | docker import - xatl-standin/bookworm:base
rm -rf "$root"
cp /etc/ssl/certs/ca-certificates.crt host-ca-certificates.crt  # this machine's CAs, for pip in the builds
docker build -f python.Dockerfile -t python:3.11-slim-bookworm .
rm host-ca-certificates.crt
docker build -f redis.Dockerfile -t redis:7.4-bookworm .
docker build -f postgres.Dockerfile -t postgres:16-bookworm .

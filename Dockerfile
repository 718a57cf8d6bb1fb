# Test image: Debian with Python 3.11 and mosquitto; runs the suite as root
# (the tests create the unprivileged user themselves via scripts/bootstrap).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends mosquitto && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN scripts/bootstrap
CMD ["scripts/test", "-q"]

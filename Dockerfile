# Tokenport gateway image: the base package only. vLLM is not installed here; workers run in
# their own images (see compose.yaml).
#
#   docker build -t tokenport .
#   docker run -p 8000:8000 -e TOKENPORT_SECRET_KEY=... -e TOKENPORT_ADMIN_TOKEN=... \
#       tokenport --worker smollm2-135m-instruct=http://WORKER:8000
#
# Two stages. The builder turns the project into a wheel and installs it into /opt/venv.
# The final stage gets only that venv and configs/: no compiler, no pip cache, no sources.

# Both stages use the same base, so the venv's interpreter path and libc match.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# Compilers for any dependency without a wheel for this platform. They stay in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY metering ./metering
COPY billing ./billing

# Build the project wheel, then install it (and its dependencies, no extras: no vLLM).
# (the venv's pip: a Debian base has no pip for the system interpreter)
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/tokenport-*.whl

# ---------------------------------------------------------------- final
FROM ${PYTHON_IMAGE} AS final

# Runtime libraries only: WeasyPrint (PDF invoices) needs Pango and HarfBuzz, and the Noto fonts
# render every invoice language (Latin, Cyrillic, CJK, right-to-left Arabic).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-noto-core fonts-noto-cjk \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 tokenport \
    && useradd --system --uid 10001 --gid tokenport --create-home --home-dir /home/tokenport \
        --shell /usr/sbin/nologin tokenport

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY configs ./configs
# data/ is the only place the gateway may write (e.g. a SQLite ledger when no
# TOKENPORT_DATABASE_URL is given). Mount a volume there to keep it.
RUN mkdir -p /app/data && chown tokenport:tokenport /app/data

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER tokenport

EXPOSE 8000

# python:slim has no curl; the standard library is enough.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["tokenport", "gateway", "--host", "0.0.0.0"]

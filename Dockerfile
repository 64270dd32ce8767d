# The API image: `docker compose up --build` runs it next to Redis (see compose.yaml).
FROM python:3.12.8-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WEB_CONCURRENCY=1

WORKDIR /app

# Dependencies first, in their own layer: editing main.py does not reinstall them. The app's only:
# requirements.txt lists them up to its first blank line, and the test tools after it.
COPY requirements.txt .
RUN sed '/^$/q' requirements.txt > app-requirements.txt \
    && pip install --no-cache-dir -r app-requirements.txt \
    && rm app-requirements.txt \
    && useradd --create-home --uid 10001 app

COPY main.py .
USER 10001

EXPOSE 8000
# Slim images have no curl: ask /health with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
# uvicorn reads the worker count from WEB_CONCURRENCY. h11 refuses headers past 16 KiB (httptools,
# the default, takes any size); past 1,000 connections at once, a worker answers 503.
CMD ["uvicorn", "main:app", "--host", "0.0.0.0", "--port", "8000", "--http", "h11", "--limit-concurrency", "1000"]

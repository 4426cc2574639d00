# The production image: the locked dependencies without dev tools or the embedded servers.
FROM python:3.11-slim AS build
RUN pip install --no-cache-dir uv
WORKDIR /app
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY src ./src
RUN uv sync --frozen --no-dev

FROM python:3.11-slim
WORKDIR /app
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
USER nobody
EXPOSE 8000
# The port is PREORDER_PORT (8000 unless set), for `preorder serve` and this check alike.
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PREORDER_PORT', '8000') + '/healthz', timeout=2)"]
CMD ["preorder", "serve", "--host", "0.0.0.0", "--workers", "2"]

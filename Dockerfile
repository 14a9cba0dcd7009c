# One image for every Tandem service; compose.yaml picks the service with `tandem serve NAME`.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY services services
COPY gateway gateway
COPY balancer balancer
COPY workers workers
COPY profiler profiler
COPY bench bench
COPY tandem tandem
RUN pip install .
ENTRYPOINT ["tandem"]
CMD ["--help"]

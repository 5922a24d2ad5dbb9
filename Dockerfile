# The reference services and the `saga` command, as used by docker-compose.yml:
#   docker build -t choreosaga .
#   docker run --rm choreosaga                      # python -m services --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies first, in their own layer: editing the code does not reinstall them.
COPY pyproject.toml README.md ./
# The otel extra too: the services export spans and metrics when OTEL_* is set.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# An editable install: SchemaRegistry.default() reads schemas/ next to the saga
# package, which a plain `pip install .` would leave behind.
COPY schemas ./schemas
COPY outbox ./outbox
COPY saga ./saga
COPY services ./services
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 --user-group choreosaga

USER 10001

CMD ["python", "-m", "services", "--help"]

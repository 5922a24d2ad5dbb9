# The reference services and the `saga` command, as used by docker-compose.yml:
#   docker build -t choreosaga .
#   docker run --rm choreosaga                      # python -m services --help
#
# The base image is a build argument so that a deployment can pin it by digest:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> .
# (`docker buildx imagetools inspect python:3.11-slim` shows the digest.)
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CONSTRAINT=/app/deploy/constraints.txt

WORKDIR /app

# Dependencies first, in their own layer, pinned by the constraints file: editing
# the code or the README does not reinstall them. The constraints also pin the
# build backend of the install below (PIP_CONSTRAINT reaches its isolated build).
COPY pyproject.toml ./
COPY deploy/constraints.txt ./deploy/
# The otel extra too: the services export spans and metrics when OTEL_* is set.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# An editable install, so that `saga` and `python -m services` (run from /app)
# use the same code.
COPY README.md LICENSE ./
COPY schemas ./schemas
COPY outbox ./outbox
COPY saga ./saga
COPY services ./services
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 --user-group choreosaga

USER 10001

CMD ["python", "-m", "services", "--help"]

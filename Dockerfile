# The service image: used by docker-compose.yml for the service, projector and simulator.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY eventdispatch ./eventdispatch
COPY projections ./projections
COPY schemas ./schemas
COPY examples ./examples
RUN pip install --no-cache-dir .
ENV EVENTDISPATCH_SCHEMA_DIR=/app/schemas
ENTRYPOINT ["eventdispatch"]

"""The control process and its lifecycle: supervision of the workers, the backend state machine,
health checks and the tables it publishes into shared memory."""

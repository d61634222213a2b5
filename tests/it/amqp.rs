//! RabbitMQ tests (need a broker; run with --include-ignored).

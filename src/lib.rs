//! big-market: the award-delivery core of a lottery platform, embedded.
//!
//! When a user wins, [`outbox::Outbox::save_award`] writes the award record and an outbox task
//! in one transaction on the shard the user id routes to (a SQLite file, or a MySQL/MariaDB
//! database with `--store`) and returns once it is durable;
//! the shard's [`relay`] then publishes the task's message (topic `send_award`) in batches and
//! marks the task completed or failed. The [`scanner`] resends
//! failed and stale tasks through a caller-runs pool; the [`consumer`] delivers each award once
//! in effect, however often its message arrives.
//!
//! Modules, in reading order:
//! - [`error`]: the one error type;
//! - [`model`]: validated ids, award records, task states, the wire message (pure);
//! - [`router`]: user id -> database and table, the original db-router formula (pure);
//! - [`retry`]: which failures count, backoff with jitter, the dead-letter limit (pure);
//! - [`config`]: settings and their validation (pure);
//! - [`store`]: the shards behind one interface (SQLite files, MySQL databases), each backend's
//!   SQL in its own module, the writer threads;
//! - [`transport`]: the broker boundary: in-process, RabbitMQ (lapin), fault injection;
//! - [`pool`]: the bounded caller-runs thread pool;
//! - [`outbox`]: the save path (return on commit), and waiting for a confirm when asked;
//! - [`publish`]: publish-and-settle of a batch, shared by the relay and the scanner;
//! - [`relay`]: the hand-off from each shard's writer and the relay that publishes in batches;
//! - [`scanner`]: the compensation scan (`scan_once`);
//! - [`consumer`]: award delivery from messages, and the backoff while the store fails;
//! - [`crash`]: named crash points for `verify`;
//! - [`verify`]: kill-and-restart rounds checked by the audit;
//! - [`metrics`]: process counters and their OpenMetrics text (prometheus-client);
//! - [`counts`]: the shard counts behind `/metrics`, kept so that counting stays a small share
//!   of the database's time;
//! - [`audit`]: proof that nothing was lost, from per-shard sequence numbers (pure);
//! - [`service`]: wiring and lifecycle;
//! - [`http`]: the HTTP interface of `serve` on hyper: server setup and deadlines, routes, the
//!   award's wire form;
//! - [`load`]: the `load` workload (many writers, wait for delivery);
//! - [`mod@bench`]: the side-by-side benchmark behind `big-market bench`;
//! - [`sweep`]: `bench --sweep`, the bench at several caller counts, its table and SVG chart;
//! - [`cli`]: the command line; `main.rs` only calls it;
//! - [`util`]: clock, random source, bounded waiting.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod bench;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod counts;
pub mod crash;
pub mod error;
pub mod http;
pub mod load;
pub mod metrics;
pub mod model;
pub mod outbox;
pub mod pool;
pub mod publish;
pub mod relay;
pub mod retry;
pub mod router;
pub mod scanner;
pub mod service;
pub mod store;
pub mod sweep;
pub mod transport;
pub mod util;
pub mod verify;

pub use error::{Error, Result};

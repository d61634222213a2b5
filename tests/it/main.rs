//! Integration tests: the library against temporary data directories, and the real binary.

mod amqp;
mod cli;
mod faults;
mod http;
mod pipeline;
mod relay;
mod support;

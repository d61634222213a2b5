//! Integration tests: the library against temporary data directories, and the real binary.

mod amqp;
mod bounded;
mod cli;
mod cluster;
mod edge;
mod faults;
mod http;
mod mariadb;
mod pipeline;
mod relay;
mod support;
mod tidy;

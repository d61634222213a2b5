//! RabbitMQ through lapin: the only code that speaks AMQP. (Filled in by the RabbitMQ work.)

use std::sync::Arc;

use super::{ConsumerHandle, Handler, Outgoing, PublishFailure, Transport};
use crate::config::Settings;
use crate::error::{Error, Result};

/// The RabbitMQ transport.
pub struct Amqp;

impl Amqp {
    /// Connect and declare the topology.
    pub fn connect(_url: &str, _settings: &Settings) -> Result<Self> {
        Err(Error::Broker("AMQP is not available in this build".into()))
    }
    /// Connect once to check the broker is reachable.
    pub fn connect_once(_settings: &Settings) -> Result<()> {
        Err(Error::Broker("AMQP is not available in this build".into()))
    }
}

impl Transport for Amqp {
    fn describe(&self) -> String {
        "amqp".into()
    }
    fn publish_batch(&self, batch: &[Outgoing]) -> Vec<Result<(), PublishFailure>> {
        batch
            .iter()
            .map(|_| Err(PublishFailure::Unavailable("no broker".into())))
            .collect()
    }
    fn is_connected(&self) -> bool {
        false
    }
    fn start_consumer(
        &self,
        _handler: Arc<dyn Handler>,
        _threads: usize,
    ) -> Result<Box<dyn ConsumerHandle>> {
        Err(Error::Broker("AMQP is not available in this build".into()))
    }
}

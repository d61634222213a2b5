//! Throw-away MySQL databases for `bench` and `verify` (crate-private): named after the
//! configured ones, on the same servers with the same credentials, dropped on drop.

use crate::config::{MysqlDatabase, StoreTarget};

/// A set of scratch databases, one per configured database.
pub(crate) struct Scratch {
    dbs: Vec<MysqlDatabase>,
}

impl Scratch {
    /// `<name>_<tag>` for each configured database. Nothing is created until a store opens them.
    pub(crate) fn new(dbs: &[MysqlDatabase], tag: &str) -> Scratch {
        Scratch {
            dbs: dbs
                .iter()
                .map(|d| d.renamed(&format!("{}_{tag}", d.name)))
                .collect(),
        }
    }

    /// The databases.
    pub(crate) fn dbs(&self) -> &[MysqlDatabase] {
        &self.dbs
    }

    /// As a store target.
    pub(crate) fn target(&self) -> StoreTarget {
        StoreTarget::Mysql(self.dbs.clone())
    }

    /// The value of `BIG_MARKET_STORE` for a child process: one URL per database, passwords
    /// included (an environment is not shown in process listings; a command line is).
    pub(crate) fn env_value(&self) -> String {
        self.dbs
            .iter()
            .map(MysqlDatabase::secret_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        use mysql::prelude::Queryable;
        for d in &self.dbs {
            let dropped = super::opts(d).map_err(|e| e.to_string()).and_then(|opts| {
                let server = mysql::OptsBuilder::from_opts(opts).db_name(None::<String>);
                mysql::Conn::new(server)
                    .and_then(|mut c| c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", d.name)))
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = dropped {
                log::warn!("could not drop the scratch database {}: {e}", d.shown);
            }
        }
    }
}

//! The SQLite backend: one file per database, `big_market_NN.db`, in WAL mode with
//! `synchronous=FULL` (a commit is durable when it returns). Reads go through an r2d2 pool; the
//! writer thread runs each group of ops in one `BEGIN IMMEDIATE` transaction, and a failing op (a
//! duplicate order id) fails alone (see `batch::run_batch`).

mod batch;
pub(crate) mod ceiling;
mod reads;
pub(crate) mod sql;

use batch::SqliteBatch;
pub(crate) use batch::{insert_award_and_task, insert_pair};
use reads::SqliteReads;

use std::path::{Path, PathBuf};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::Opened;
use crate::config::Settings;
use crate::error::{Error, Result};
use crate::router::{db_name, Layout};

type Pool = r2d2::Pool<SqliteConnectionManager>;

/// Most ops a shard writer commits together. Each commit writes every page its group changed,
/// and an award's random keys (its order id, its user) land on pages of their own: the larger
/// the group, the fewer pages written per award (batched saves side by side: ARCHITECTURE,
/// "The SQLite writer's costs"); a group's sub-journal stays in memory (`.cargo/config.toml`).
const GROUP_COMMIT_MAX: usize = 1024;

/// Where database `db` of a data directory lives.
pub(crate) fn shard_path(settings: &Settings, db: u32) -> PathBuf {
    settings.data_dir.join(format!("{}.db", db_name(db)))
}

/// Open every shard file of `settings.data_dir`; with `create`, make the directory and any
/// missing file. Refuses files of another layout or schema, and files that are not shards.
pub(crate) fn open_all(settings: &Settings, create: bool) -> Result<Vec<Opened>> {
    let dir = &settings.data_dir;
    let layout = settings.layout;
    if create {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
    } else if !dir.is_dir() {
        return Err(Error::Config(format!(
            "no data directory at {}: run `big-market init` first or pass --data-dir",
            dir.display()
        )));
    }
    check_no_foreign_shards(dir, layout)?;
    // Some shards there and others missing is a data directory that lost files (a copy cut
    // short, a file moved away): creating the missing ones empty would silently drop every
    // award they held.
    let (present, missing): (Vec<u32>, Vec<u32>) =
        (1..=layout.db_count()).partition(|db| shard_path(settings, *db).exists());
    if !present.is_empty() && !missing.is_empty() {
        // What is wrong with the files that are there is said first (another layout, not a
        // shard at all), as any command would find it.
        for db in &present {
            drop(open_shard(settings, *db, false)?);
        }
        let names = |dbs: &[u32]| {
            dbs.iter()
                .map(|db| format!("{}.db", db_name(*db)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Error::Config(format!(
            "{} holds {} but not {}: a shard file is missing; put it back (from the backup it was copied with), nothing was created",
            dir.display(),
            names(&present),
            names(&missing)
        )));
    }
    (1..=layout.db_count())
        .map(|db| open_shard(settings, db, create))
        .collect()
}

fn check_no_foreign_shards(dir: &Path, layout: Layout) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let idx = name
            .strip_prefix("big_market_")
            .and_then(|s| s.strip_suffix(".db"))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(idx) = idx {
            if idx == 0 || idx > layout.db_count() {
                return Err(Error::Config(format!(
                    "{} holds {name}, which a layout of {} databases does not have: this data dir was made with another --db-count",
                    dir.display(),
                    layout.db_count()
                )));
            }
        }
    }
    Ok(())
}

pub(crate) fn configure(conn: &Connection, busy: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("journal_mode is {mode}, WAL is required")),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Checkpoint every 10,000 WAL pages (about 40 MB) instead of SQLite's 1,000: at about 15
    // pages per award, the default made every ~70th award's commit copy the WAL back and fsync
    // the database file as well.
    conn.pragma_update(None, "wal_autocheckpoint", 10000)?;
    Ok(())
}

fn open_shard(settings: &Settings, db: u32, create: bool) -> Result<Opened> {
    let path = shard_path(settings, db);
    let layout = settings.layout;
    if !create && !path.exists() {
        return Err(Error::Config(format!(
            "shard file {} is missing: run `big-market init` (with the same --db-count/--tb-count) first",
            path.display()
        )));
    }
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn =
        Connection::open_with_flags(&path, flags).map_err(|e| Error::storage(ctx("opening"), e))?;
    configure(&conn, settings.busy_timeout).map_err(|e| Error::storage(ctx("opening"), e))?;
    // The file's layout must be this run's; checked before anything is written to it.
    let check_layout = |conn: &Connection| -> Result<()> {
        let (file_db, dbs, tbs) =
            sql::shard_layout(conn).map_err(|e| Error::storage(ctx("reading the layout of"), e))?;
        if (file_db, dbs, tbs) != (db, layout.db_count(), layout.tb_count()) {
            return Err(Error::Config(format!(
                "{} was created as database {file_db:02} of a {dbs} x {tbs} layout, but this run uses {} x {}: pass --db-count {dbs} --tb-count {tbs}, or another --data-dir",
                path.display(),
                layout.db_count(),
                layout.tb_count()
            )));
        }
        Ok(())
    };
    // A shard of this version is checked with plain reads; only one to create or upgrade takes
    // the write lock (a writer busy with back-to-back group commits can hold it for long).
    let current = sql::schema_version(&conn)
        .map_err(|e| Error::storage(ctx("reading the schema version of"), e))?
        == sql::SCHEMA_VERSION;
    if !current {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::storage(ctx("locking"), e))?;
        let version = sql::schema_version(&tx)
            .map_err(|e| Error::storage(ctx("reading the schema version of"), e))?;
        if version == 0 {
            let objects: i64 = tx
                .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(|e| Error::storage(ctx("reading"), e))?;
            if objects > 0 {
                return Err(Error::Config(format!(
                    "{} is a SQLite file but not a big-market shard (no schema version): move it away",
                    path.display()
                )));
            }
            sql::apply_schema(
                &tx,
                db,
                layout.db_count(),
                layout.tb_count(),
                crate::util::now_ms(),
            )
            .map_err(|e| Error::storage(ctx("creating the schema in"), e))?;
            log::info!(
                "created shard path={} db={} tables={}",
                path.display(),
                db_name(db),
                layout.tb_count()
            );
        } else if version == 1 {
            check_layout(&tx)?;
            sql::upgrade_from_1(&tx)
                .map_err(|e| Error::storage(ctx("upgrading the schema of"), e))?;
            log::info!(
                "upgraded shard path={} schema_version={}",
                path.display(),
                sql::SCHEMA_VERSION
            );
        } else if version > sql::SCHEMA_VERSION {
            return Err(Error::Config(format!(
                "{} has schema version {version}, newer than this build's {}: use a newer big-market",
                path.display(),
                sql::SCHEMA_VERSION
            )));
        }
        tx.commit()
            .map_err(|e| Error::storage(ctx("initialising"), e))?;
    }
    check_layout(&conn)?;
    drop(conn);
    let busy = settings.busy_timeout;
    let manager = SqliteConnectionManager::file(&path)
        .with_flags(
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .with_init(move |c| configure(c, busy));
    let pool = r2d2::Pool::builder()
        .max_size(4)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(10))
        .build_unchecked(manager);
    let write_conn = pool
        .get()
        .map_err(|e| Error::Config(format!("cannot open {}: {e}", path.display())))?;
    if let Some(pages) = settings.max_shard_pages {
        write_conn
            .pragma_update(None, "max_page_count", pages)
            .map_err(|e| Error::storage(ctx("capping the size of"), e))?;
    }
    Ok(Opened {
        location: path.display().to_string(),
        reads: Box::new(SqliteReads { path, pool }),
        // SQLite has one writer per file: one lane.
        lanes: vec![Box::new(SqliteBatch {
            db,
            conn: write_conn,
        })],
        lane_of: |_| 0,
        // A local file: its busy timeout bounds a wait on another process's lock.
        call_deadline: None,
        group_commit_max: GROUP_COMMIT_MAX,
    })
}

/// The driver's errors, with what to do about each: only this backend knows their codes.
impl From<rusqlite::Error> for crate::error::StorageError {
    fn from(e: rusqlite::Error) -> Self {
        let code = e.sqlite_error_code();
        let hint = match code {
            Some(rusqlite::ErrorCode::NotADatabase) => {
                " (the file is not a SQLite database: move it away or point --data-dir elsewhere)"
            }
            Some(rusqlite::ErrorCode::DiskFull) => {
                " (the disk is full, or the shard reached its size limit: free space, e.g. `big-market tasks purge --older-than 7d`, and retry)"
            }
            Some(rusqlite::ErrorCode::ReadOnly) | Some(rusqlite::ErrorCode::CannotOpen) => {
                " (check that the data directory exists and is writable)"
            }
            Some(rusqlite::ErrorCode::DatabaseBusy) => {
                " (another process holds the shard's write lock: retry)"
            }
            _ => "",
        };
        let full = code == Some(rusqlite::ErrorCode::DiskFull);
        crate::error::StorageError::new(e, hint, full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::award_table;

    #[test]
    fn configure_sets_wal_a_full_sync_and_a_checkpoint_every_10000_pages() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        // Away from every value `configure` sets (the bundled SQLite's defaults are FULL and
        // 1,000 already), so that each assertion below holds only if `configure` set it.
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA wal_autocheckpoint = 1;")
            .unwrap();
        configure(&conn, Duration::from_secs(1)).unwrap();
        let pragma = |name: &str| -> String {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
            .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "wal");
        assert_eq!(pragma("synchronous"), "2", "FULL");
        assert_eq!(pragma("wal_autocheckpoint"), "10000");
        assert_eq!(pragma("busy_timeout"), "1000");
    }

    #[test]
    fn schema_applies_to_a_fresh_file_with_every_split_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        sql::apply_schema(&conn, 1, 2, 4, 0).unwrap();
        for t in 0..4 {
            let n: i64 = conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM {}", award_table(t)),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 0);
        }
        assert_eq!(sql::schema_version(&conn).unwrap(), sql::SCHEMA_VERSION);
        assert_eq!(sql::shard_layout(&conn).unwrap(), (1, 2, 4));
        let mut conn = conn;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        assert_eq!(sql::take_seq(&tx).unwrap(), 1);
        assert_eq!(sql::take_seq(&tx).unwrap(), 2);
    }

    #[test]
    fn the_bundled_sqlite_is_built_with_the_projects_flags() {
        // `.cargo/config.toml` sets them; a build that misses it (LIBSQLITE3_FLAGS replaced in
        // the environment) loses the writer's in-memory sub-journal and brings back the global
        // page-cache mutex.
        let conn = Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "STMTJRNL_SPILL=16777216"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
    }

    /// A shard with tasks 1..=6: all completed at time 10 and delivered, except 4 (pending, not
    /// delivered); 2 was received three times.
    fn shard_with_a_gap() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        sql::apply_schema(&conn, 1, 2, 4, 0).unwrap();
        for seq in 1..=6u64 {
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            sql::take_seq(&conn).unwrap();
            conn.execute_batch("COMMIT").unwrap();
            let state = if seq == 4 { "create" } else { "completed" };
            conn.execute(
                "INSERT INTO task (user_id, topic, message_id, message, state, seq, next_attempt_at, create_time, update_time)
                 VALUES ('u', 't', ?1, '{}', ?2, ?3, 0, 10, 10)",
                rusqlite::params![format!("m{seq}"), state, seq],
            )
            .unwrap();
            if seq != 4 {
                let receipts = if seq == 2 { 3 } else { 1 };
                conn.execute(
                    "INSERT INTO delivery (message_id, seq, order_id, receipts, delivered_at) VALUES (?1, ?2, 'o', ?3, 10)",
                    rusqlite::params![format!("m{seq}"), seq, receipts],
                )
                .unwrap();
            }
        }
        (dir, conn)
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn compaction_folds_up_to_the_first_gap_and_keeps_redeliveries_visible() {
        let (_dir, conn) = shard_with_a_gap();
        assert_eq!(
            sql::compact(&conn, 5, 100).unwrap(),
            0,
            "too young: nothing folds"
        );
        assert_eq!(
            sql::compact(&conn, 11, 2).unwrap(),
            2,
            "at most `max` a step"
        );
        assert_eq!(
            sql::compact(&conn, 11, 100).unwrap(),
            1,
            "stops before the gap at 4"
        );
        assert_eq!(sql::watermark(&conn).unwrap(), 3);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM task WHERE seq <= 3"), 0);
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM delivery WHERE seq <= 3"),
            1,
            "the row received three times stays"
        );
        assert_eq!(sql::compact(&conn, 11, 100).unwrap(), 0, "the gap holds it");
        assert!(sql::tasks_below_watermark(&conn).unwrap().is_empty());
        // Once 4 is delivered and completed, the rest folds.
        conn.execute_batch(
            "UPDATE task SET state = 'completed' WHERE seq = 4;
             INSERT INTO delivery (message_id, seq, order_id, receipts, delivered_at) VALUES ('m4', 4, 'o', 1, 10);",
        )
        .unwrap();
        assert_eq!(sql::compact(&conn, 11, 100).unwrap(), 3);
        assert_eq!(sql::watermark(&conn).unwrap(), 6);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM task"), 0);
    }

    #[test]
    fn a_version_1_shard_is_upgraded_with_a_zero_watermark_and_compacts() {
        // A file made by the version 1 schema, with a delivered, completed task.
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("s.db")).unwrap();
        let v1 = include_str!("../../../tests/fixtures/schema_v1.sql");
        for script in crate::store::schema_scripts(v1, 4) {
            conn.execute_batch(&script).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO shard_meta (id, db_idx, db_count, tb_count, next_seq, create_time) VALUES (1, 1, 2, 4, 2, 0);
             INSERT INTO task (user_id, topic, message_id, message, state, seq, next_attempt_at, create_time, update_time)
               VALUES ('u', 't', 'm1', '{}', 'completed', 1, 0, 10, 10);
             INSERT INTO delivery (message_id, seq, order_id, receipts, delivered_at) VALUES ('m1', 1, 'o', 1, 10);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        sql::upgrade_from_1(&conn).unwrap();
        assert_eq!(sql::schema_version(&conn).unwrap(), sql::SCHEMA_VERSION);
        assert_eq!(sql::watermark(&conn).unwrap(), 0);
        assert_eq!(sql::compact(&conn, 11, 100).unwrap(), 1);
        assert_eq!(sql::watermark(&conn).unwrap(), 1);
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'idx_delivery_seq'"
            ),
            1,
            "the first compaction built the index"
        );
    }
}

//! The shard router: the original db-router's formula, byte for byte, as a pure function.
//!
//! `h = String.hashCode(user_id)` (over UTF-16 code units, 32-bit wrapping),
//! `idx = (dbCount * tbCount - 1) & (h ^ (h >>> 16))`, `db = idx / tbCount + 1`,
//! `table = idx - tbCount * (db - 1)`. A user lands on the same database and table
//! as in the MySQL system, so data can move between the two.

use crate::error::{Error, Result};

/// How many databases (shard files) and split tables per database there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    db_count: u32,
    tb_count: u32,
}

impl Layout {
    /// Validate a layout: both counts at least 1, their product a power of two, at most 99 databases.
    pub fn new(db_count: u32, tb_count: u32) -> Result<Self> {
        if db_count == 0 || tb_count == 0 {
            return Err(Error::Config(format!(
                "layout {db_count} databases x {tb_count} tables: both counts must be at least 1"
            )));
        }
        if db_count > 99 || tb_count > 1000 {
            return Err(Error::Config(format!(
                "layout {db_count} databases x {tb_count} tables: at most 99 databases and 1000 tables"
            )));
        }
        let size = db_count * tb_count;
        if !size.is_power_of_two() {
            return Err(Error::Config(format!(
                "layout {db_count} databases x {tb_count} tables: db-count x tb-count = {size} must be a power of two (the router masks the hash with size - 1)"
            )));
        }
        Ok(Layout { db_count, tb_count })
    }

    /// Number of databases (shard files).
    pub fn db_count(&self) -> u32 {
        self.db_count
    }

    /// Number of split award tables in each database.
    pub fn tb_count(&self) -> u32 {
        self.tb_count
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            db_count: 2,
            tb_count: 4,
        }
    }
}

/// Where one user's rows live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// 1-based database index (`big_market_01` is 1).
    pub db: u32,
    /// 0-based table index (`user_award_record_000` is 0).
    pub table: u32,
}

impl Route {
    /// The database name, `big_market_NN`.
    pub fn db_name(&self) -> String {
        db_name(self.db)
    }

    /// The award table name, `user_award_record_NNN`.
    pub fn table_name(&self) -> String {
        award_table(self.table)
    }
}

/// The database name for a 1-based index.
pub fn db_name(db: u32) -> String {
    format!("big_market_{db:02}")
}

/// The award table name for a 0-based index.
pub fn award_table(table: u32) -> String {
    format!("user_award_record_{table:03}")
}

/// Java's `String.hashCode`: `h = 31 * h + c` over UTF-16 code units, wrapping at 32 bits.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(i32::from(c)))
}

/// Route a user id under a layout. Pure: the same id and layout always give the same route.
pub fn route(user_id: &str, layout: Layout) -> Route {
    let size = layout.db_count * layout.tb_count;
    let h = java_string_hash(user_id) as u32;
    let idx = (size - 1) & (h ^ (h >> 16));
    let db = idx / layout.tb_count + 1;
    let table = idx - layout.tb_count * (db - 1);
    Route { db, table }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_hash_matches_known_java_values() {
        // Values of "…".hashCode() in Java.
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("hello"), 99162322);
        assert_eq!(java_string_hash("xiaofuge"), 265141580);
        assert_eq!(java_string_hash("user001"), -147179898);
        // Overflow wraps like Java's int.
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
    }

    #[test]
    fn java_hash_uses_utf16_code_units() {
        // U+1F600 is a surrogate pair in UTF-16: 0xD83D 0xDE00.
        assert_eq!(java_string_hash("😀"), 0xD83D * 31 + 0xDE00);
        assert_eq!(java_string_hash("😀"), 1772899);
        // "小傅哥".hashCode() and "用户123".hashCode() in Java.
        assert_eq!(java_string_hash("小傅哥"), 23308623);
        assert_eq!(java_string_hash("用户123"), -1617445437);
    }

    #[test]
    fn known_vectors_from_the_original_system() {
        let l = Layout::default();
        let r = route("xiaofuge", l);
        assert_eq!(
            (r.db_name(), r.table_name()),
            ("big_market_01".into(), "user_award_record_001".into())
        );
        let r = route("user001", l);
        assert_eq!(
            (r.db_name(), r.table_name()),
            ("big_market_02".into(), "user_award_record_000".into())
        );
        // Ids with spaces, which the original's varchar(32) holds; values from the Java formula.
        for (id, db, table) in [
            ("user 4", "big_market_02", "user_award_record_000"),
            (" lead", "big_market_01", "user_award_record_001"),
            ("小 傅", "big_market_02", "user_award_record_001"),
        ] {
            let r = route(id, l);
            assert_eq!(
                (r.db_name(), r.table_name()),
                (db.into(), table.into()),
                "{id:?}"
            );
        }
    }

    #[test]
    fn pinned_routes_for_a_dozen_ids() {
        let l = Layout::default();
        let got: Vec<(u32, u32)> = [
            "xiaofuge",
            "user001",
            "user002",
            "user003",
            "",
            "a",
            "hello",
            "liergou",
            "小傅哥",
            "用户123",
            "😀",
            "polygenelubricants",
            "9999999999",
        ]
        .iter()
        .map(|id| {
            let r = route(id, l);
            (r.db, r.table)
        })
        .collect();
        assert_eq!(got, PINNED.to_vec());
    }

    /// Computed by the Java formula itself (`String.hashCode`, `h ^ (h >>> 16)`, 2 x 4) on a JVM.
    const PINNED: [(u32, u32); 13] = [
        (1, 1),
        (2, 0),
        (2, 1),
        (1, 2),
        (1, 0),
        (1, 1),
        (1, 3),
        (1, 1),
        (2, 0),
        (2, 0),
        (1, 0),
        (1, 0),
        (2, 3),
    ];

    #[test]
    fn layouts_that_are_not_powers_of_two_are_refused() {
        assert!(Layout::new(3, 4).is_err());
        assert!(Layout::new(0, 4).is_err());
        assert!(Layout::new(2, 0).is_err());
        let err = Layout::new(3, 1).unwrap_err().to_string();
        assert!(err.contains("power of two"), "{err}");
        assert!(Layout::new(1, 1).is_ok());
        assert!(Layout::new(4, 8).is_ok());
    }

    #[test]
    fn every_route_is_inside_the_layout() {
        for (dbs, tbs) in [(1, 1), (2, 4), (4, 2), (8, 16), (1, 8)] {
            let l = Layout::new(dbs, tbs).unwrap();
            for i in 0..2000 {
                let r = route(&format!("u{i}"), l);
                assert!(
                    (1..=dbs).contains(&r.db) && r.table < tbs,
                    "{r:?} outside {dbs}x{tbs}"
                );
            }
        }
    }
}

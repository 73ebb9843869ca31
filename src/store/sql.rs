//! The few places where SQLite and PostgreSQL spell SQL differently, as fragments the queries
//! splice in. Everything else is written once, with `$N` parameters, which both accept.

/// PostgreSQL `NOTIFY` channels: an event was committed (payload `<job> <seq>`), a job was queued.
pub(crate) const EVENTS_CHANNEL: &str = "sftd_events";
pub(crate) const QUEUE_CHANNEL: &str = "sftd_queue";

/// Which engine is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a `SFTD_DATABASE_URL` names, if any.
    pub(crate) fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// The database's clock in unix milliseconds (leases and heartbeats are judged by one clock,
    /// the database's, never by the hosts' own).
    pub(crate) fn now_ms(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Self::Postgres => "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Appended to the claim's inner `SELECT`: PostgreSQL skips rows another claim has locked;
    /// SQLite has one writer at a time, so there is nothing to skip.
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// `(key, value)` rows of a JSON object held in a text column.
    pub(crate) fn json_pairs(self, column: &str) -> String {
        match self {
            Self::Sqlite => format!("json_each({column})"),
            Self::Postgres => format!("jsonb_each_text({column}::jsonb)"),
        }
    }

    /// The elements (as `value`) of a JSON array of strings bound as parameter `param`.
    pub(crate) fn json_array(self, param: &str) -> String {
        match self {
            Self::Sqlite => format!("json_each({param})"),
            Self::Postgres => format!("jsonb_array_elements_text({param}::jsonb)"),
        }
    }

    /// A top-level field of a JSON text column (SQL NULL when absent or JSON null); `key` is a
    /// SQL expression (a literal or a parameter).
    pub(crate) fn json_field(self, column: &str, key: &str) -> String {
        match self {
            Self::Sqlite => format!("json_extract({column}, '$.' || {key})"),
            Self::Postgres => format!("({column}::jsonb ->> {key})"),
        }
    }

    /// The column that orders `files` by registration.
    pub(crate) fn file_order(self) -> &'static str {
        match self {
            Self::Sqlite => "rowid",
            Self::Postgres => "n",
        }
    }
}

//! The schema migrations, embedded in the binary. Each engine's list is its `migrations/<engine>`
//! directory file by file; they are read the way sqlx reads a directory at run time (a test holds
//! the two equal), so a database migrated by an older build sees the same versions and checksums.
//! Embedding them by hand instead of with `sqlx::migrate!` keeps sqlx's proc-macro crates, and
//! the second, host-side build of sqlx and SQLite they bring, out of every compile.

use super::sql::Backend;
use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;

/// `(file name, SQL)`, in version order.
type Files = &'static [(&'static str, &'static str)];

const SQLITE: Files = &[
    (
        "0001_init.sql",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        "0002_estimated_memory.sql",
        include_str!("../../migrations/sqlite/0002_estimated_memory.sql"),
    ),
    (
        "0003_leases.sql",
        include_str!("../../migrations/sqlite/0003_leases.sql"),
    ),
];

const POSTGRES: Files = &[(
    "0001_init.sql",
    include_str!("../../migrations/postgres/0001_init.sql"),
)];

/// The migrator for `backend`'s schema.
pub(super) async fn migrator(backend: Backend) -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(Embedded(files(backend))).await
}

fn files(backend: Backend) -> Files {
    match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    }
}

#[derive(Debug)]
struct Embedded(Files);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { self.0.iter().map(|(name, sql)| parse(name, sql)).collect() })
    }
}

/// `<version>_<description>.sql` → a migration, as sqlx names one: the description is the rest of
/// the name without the type's suffix, underscores read as spaces; a script that starts with
/// `-- no-transaction` runs outside a transaction.
fn parse(name: &'static str, sql: &'static str) -> Result<Migration, BoxDynError> {
    let kind = MigrationType::from_filename(name);
    let (version, rest) = name
        .split_once('_')
        .ok_or_else(|| format!("migration {name:?} is not named <version>_<description>.sql"))?;
    let version: i64 = version
        .parse()
        .map_err(|e| format!("migration {name:?}: {e}"))?;
    let description = rest
        .strip_suffix(kind.suffix())
        .ok_or_else(|| format!("migration {name:?} does not end in {:?}", kind.suffix()))?
        .replace('_', " ");
    let no_tx = sql.starts_with("-- no-transaction");
    Ok(Migration::new(
        version,
        Cow::Owned(description),
        kind,
        Cow::Borrowed(sql),
        no_tx,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The embedded lists are the directories, read by sqlx's own directory source: no file left
    /// out, none stale, every version, description, type and checksum as sqlx computes them.
    #[tokio::test]
    async fn embedded_migrations_match_the_directories() {
        for (backend, dir) in [
            (Backend::Sqlite, "migrations/sqlite"),
            (Backend::Postgres, "migrations/postgres"),
        ] {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
            let from_dir = Migrator::new(root.as_path()).await.unwrap();
            let embedded = migrator(backend).await.unwrap();
            let key = |m: &Migration| {
                let kind = format!("{:?}", m.migration_type);
                let checksum = m.checksum.to_vec();
                (
                    m.version,
                    m.description.to_string(),
                    kind,
                    checksum,
                    m.no_tx,
                    m.sql.to_string(),
                )
            };
            let want: Vec<_> = from_dir.iter().map(key).collect();
            let got: Vec<_> = embedded.iter().map(key).collect();
            assert!(!want.is_empty(), "{dir} is empty");
            assert_eq!(got, want, "{dir}");
        }
    }
}

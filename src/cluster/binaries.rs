//! Finding the installed PostgreSQL server binaries (`initdb`, `postgres`, `pg_basebackup`, `psql`).
//!
//! Debian installs each major version side by side under `/usr/lib/postgresql/<major>/bin` and puts only
//! wrappers on `PATH`, so `PATH` alone is not a reliable way to find `initdb`.
//! See <https://www.postgresql.org/docs/current/app-pgconfig.html> for `pg_config --bindir`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::ClusterError;

/// Environment variable naming a directory that holds `initdb`, `postgres`, ...; wins over everything else.
pub const PG_BIN_ENV: &str = "PGRELAY_PG_BIN";

/// Where Debian and Ubuntu install versioned server binaries.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// Finds the directory holding the Postgres server binaries.
///
/// Order: `$PGRELAY_PG_BIN`, then `pg_config --bindir` (if it contains `initdb`), then the newest
/// `/usr/lib/postgresql/<version>/bin` that contains `initdb`.
pub fn find_pg_bin() -> Result<PathBuf, ClusterError> {
    let mut searched = Vec::new();

    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let dir = PathBuf::from(dir);
        // An explicit setting that is wrong should fail loudly rather than silently pick another version.
        if has_initdb(&dir) {
            return Ok(dir);
        }
        return Err(ClusterError::NoPgBinaries {
            searched: format!("{PG_BIN_ENV}={} (no initdb there)", dir.display()),
        });
    }

    match pg_config_bindir() {
        Some(dir) if has_initdb(&dir) => return Ok(dir),
        Some(dir) => searched.push(format!("pg_config --bindir ({})", dir.display())),
        None => searched.push("pg_config --bindir (not found)".to_string()),
    }

    let candidates = versioned_bin_dirs(Path::new(DEBIAN_PG_ROOT));
    if let Some(dir) = newest_with_initdb(candidates, has_initdb) {
        return Ok(dir);
    }
    searched.push(format!("{DEBIAN_PG_ROOT}/*/bin"));

    Err(ClusterError::NoPgBinaries {
        searched: searched.join(", "),
    })
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| PathBuf::from(trimmed))
}

/// Lists `(version, root/<version>/bin)` for every entry of `root` whose name parses as a version.
fn versioned_bin_dirs(root: &Path) -> Vec<(Vec<u32>, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = parse_version(&name)?;
            Some((version, entry.path().join("bin")))
        })
        .collect()
}

/// Parses "15", "9.6" or "17.2" into numeric components so that 10 sorts after 9.6.
pub(crate) fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.')
        .map(|part| part.parse::<u32>().ok())
        .collect::<Option<Vec<u32>>>()
        .filter(|parts| !parts.is_empty())
}

/// Picks the highest version whose directory passes `usable`.
pub(crate) fn newest_with_initdb(
    mut candidates: Vec<(Vec<u32>, PathBuf)>,
    usable: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    candidates.sort_by(|a, b| b.0.cmp(&a.0));
    candidates
        .into_iter()
        .map(|(_, dir)| dir)
        .find(|dir| usable(dir))
}

/// Path of a client tool (`psql`, `pg_isready`): the server bin dir if it has it, else rely on `PATH`.
pub(crate) fn client_tool(bin_dir: &Path, name: &str) -> PathBuf {
    let in_bin = bin_dir.join(name);
    if in_bin.is_file() {
        in_bin
    } else {
        PathBuf::from(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let candidates = vec![
            (
                parse_version("9.6").unwrap_or_default(),
                PathBuf::from("/pg/9.6/bin"),
            ),
            (
                parse_version("15").unwrap_or_default(),
                PathBuf::from("/pg/15/bin"),
            ),
            (
                parse_version("10").unwrap_or_default(),
                PathBuf::from("/pg/10/bin"),
            ),
        ];
        assert_eq!(
            newest_with_initdb(candidates, |_| true),
            Some(PathBuf::from("/pg/15/bin"))
        );
    }

    #[test]
    fn skips_versions_without_initdb() {
        let candidates = vec![
            (vec![16], PathBuf::from("/pg/16/bin")),
            (vec![15], PathBuf::from("/pg/15/bin")),
            (vec![14], PathBuf::from("/pg/14/bin")),
        ];
        let chosen = newest_with_initdb(candidates, |dir| dir != Path::new("/pg/16/bin"));
        assert_eq!(chosen, Some(PathBuf::from("/pg/15/bin")));
    }

    #[test]
    fn nothing_usable_is_none() {
        let candidates = vec![(vec![15], PathBuf::from("/pg/15/bin"))];
        assert_eq!(newest_with_initdb(candidates, |_| false), None);
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("main"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("15.x"), None);
    }

    #[test]
    fn reads_versioned_dirs_from_disk() {
        let root = std::env::temp_dir().join(format!("pgrelay-bin-test-{}", std::process::id()));
        for version in ["9.6", "13", "notaversion"] {
            std::fs::create_dir_all(root.join(version).join("bin")).unwrap_or_default();
        }
        let mut found = versioned_bin_dirs(&root);
        found.sort();
        let versions: Vec<Vec<u32>> = found.into_iter().map(|(v, _)| v).collect();
        assert_eq!(versions, vec![vec![9, 6], vec![13]]);
        std::fs::remove_dir_all(&root).unwrap_or_default();
    }
}

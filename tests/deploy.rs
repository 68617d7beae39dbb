//! The Docker Compose setup agrees with itself and with the code: docker-compose.yml, the
//! Dockerfile, deploy/pgrelay.toml, deploy/prometheus.yml, Grafana's provisioning and the
//! dashboard. (The machine that runs the tests has no Docker engine, so this is what is checked
//! instead of `docker compose up`.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use pgrelay::config::{Config, ReplicationMode, Role};
use serde_json::{json, Value};
use yaml_rust2::{Yaml, YamlLoader};

use common::grafana::{self, repo_path};

const PGRELAY_CONFIG: &str = "deploy/pgrelay.toml";

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// A YAML file as JSON values, with aliases and `<<` merge keys resolved (compose files use
/// both).
fn yaml(relative: &str) -> Value {
    let docs = YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "{relative}: one YAML document");
    to_json(&docs[0])
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse::<f64>().map_or(Value::Null, |f| json!(f)),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(map) => {
            let mut out = serde_json::Map::new();
            // Merged keys first, so the mapping's own keys override them.
            if let Some(merged) = map.get(&Yaml::String("<<".into())) {
                let sources = match merged {
                    Yaml::Array(list) => list.clone(),
                    one => vec![one.clone()],
                };
                for source in sources {
                    if let Value::Object(m) = to_json(&source) {
                        out.extend(m);
                    }
                }
            }
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                if key != "<<" {
                    out.insert(key, to_json(v));
                }
            }
            Value::Object(out)
        }
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => panic!("unresolved YAML node {y:?}"),
    }
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn config() -> Config {
    Config::load(&repo_path(PGRELAY_CONFIG))
        .unwrap_or_else(|e| panic!("{PGRELAY_CONFIG} does not load: {e}"))
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(s.is_object(), "docker-compose.yml has no service {name:?}");
    s
}

/// The name of the service whose image starts with `image` (e.g. `prom/prometheus`).
fn service_by_image(compose: &Value, image: &str) -> String {
    let names: Vec<String> = compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with(image)))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(names.len(), 1, "one service runs {image}: {names:?}");
    names[0].clone()
}

/// The service built from the repository's Dockerfile.
fn pgrelay_service(compose: &Value) -> String {
    let names: Vec<String> = compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| {
            s["build"] == json!(".")
                || (s["build"]["context"] == json!(".")
                    && s["build"]["dockerfile"]
                        .as_str()
                        .is_none_or(|d| d == "Dockerfile"))
        })
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "one service is built from ./Dockerfile: {names:?}"
    );
    names[0].clone()
}

/// A service's `command` as a list of words.
fn command(service: &Value) -> Vec<String> {
    match &service["command"] {
        Value::Array(words) => words
            .iter()
            .map(|w| match w {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// A service's bind mounts as (host path relative to the repository, container path).
fn binds(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let v = v.as_str()?;
            let mut parts = v.split(':');
            let host = parts.next()?;
            let container = parts.next()?;
            host.starts_with("./").then(|| {
                (
                    host.trim_start_matches("./")
                        .trim_end_matches('/')
                        .to_owned(),
                    container.trim_end_matches('/').to_owned(),
                )
            })
        })
        .collect()
}

/// Where `host_path` (relative to the repository) is mounted in `service`, if it is.
fn mounted_at(service: &Value, host_path: &str) -> Option<String> {
    binds(service)
        .into_iter()
        .find(|(h, _)| h == host_path)
        .map(|(_, c)| c)
}

/// The container ports a service publishes (`"HOST:CONTAINER"` or `"CONTAINER"`).
fn published(service: &Value) -> BTreeMap<u16, u16> {
    service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let text = match p {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let words: Vec<&str> = text.split(':').collect();
            let container: u16 = words.last().unwrap().parse().unwrap();
            let host: u16 = if words.len() > 1 {
                words[words.len() - 2].parse().unwrap()
            } else {
                container
            };
            (container, host)
        })
        .collect()
}

fn env<'a>(service: &'a Value, key: &str) -> Option<&'a str> {
    service["environment"][key].as_str()
}

/// The files a service's init directory runs (`/docker-entrypoint-initdb.d`), concatenated.
fn init_sql(service: &Value) -> String {
    binds(service)
        .into_iter()
        .filter(|(_, c)| c.starts_with("/docker-entrypoint-initdb.d"))
        .map(|(h, _)| read(&h))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_pgrelay_config_loads_and_its_nodes_are_compose_services() {
    let c = config();
    let compose = compose();
    for node in &c.nodes {
        let s = service(&compose, &node.host);
        let image = s["image"].as_str().unwrap_or("");
        assert!(
            image.starts_with("postgres:"),
            "node {:?}: service {:?} runs {image:?}, not the postgres image",
            node.name,
            node.host
        );
        // The postgres image listens on 5432 unless told otherwise.
        let port = command(s)
            .iter()
            .find_map(|w| w.strip_prefix("port=").map(|p| p.parse::<u16>().unwrap()))
            .unwrap_or(5432);
        assert_eq!(node.port, port, "node {:?}: port", node.name);
    }
    let leader = service(&compose, &c.leader().host);
    if c.replication.mode == ReplicationMode::Row {
        assert!(
            command(leader).iter().any(|w| w == "wal_level=logical"),
            "row mode needs the leader started with wal_level=logical"
        );
    }
    if c.replication.mode != ReplicationMode::Physical {
        for f in c.nodes.iter().filter(|n| n.role == Role::Follower) {
            let s = service(&compose, &f.host);
            assert!(
                !command(s).iter().any(|w| w.contains("primary_conninfo")),
                "follower {:?}: row and statement mode followers are writable servers, not standbys",
                f.name
            );
        }
    }
}

#[test]
fn every_user_exists_on_every_node_with_its_password() {
    let c = config();
    let compose = compose();
    for node in &c.nodes {
        let s = service(&compose, &node.host);
        let sql = init_sql(s);
        for user in &c.users {
            let superuser = env(s, "POSTGRES_USER").unwrap_or("postgres");
            let ok = if user.name == superuser {
                env(s, "POSTGRES_PASSWORD") == Some(user.password.expose())
            } else {
                sql.contains(&format!(
                    "CREATE ROLE {} LOGIN PASSWORD '{}'",
                    user.name,
                    user.password.expose()
                ))
            };
            assert!(
                ok,
                "user {:?} with pgrelay's password does not exist on node {:?} \
                 (POSTGRES_USER/POSTGRES_PASSWORD or a CREATE ROLE in its init scripts)",
                user.name, node.name
            );
        }
    }
    // pgrelay's own connections need a superuser outside physical mode: the image's.
    let leader = service(&compose, &c.leader().host);
    if c.replication.mode != ReplicationMode::Physical {
        assert_eq!(
            Some(c.replication.user.as_str()),
            env(leader, "POSTGRES_USER").or(Some("postgres")),
            "replication.user is the image's superuser"
        );
        let sql = init_sql(leader);
        for db in &c.replication.databases {
            assert!(
                env(leader, "POSTGRES_DB") == Some(db.as_str())
                    || sql.contains(&format!("CREATE DATABASE {db}")),
                "replicated database {db:?} is not created on the leader"
            );
        }
    }
}

#[test]
fn pgrelay_service_runs_this_config_and_publishes_its_ports() {
    let c = config();
    let compose = compose();
    let name = pgrelay_service(&compose);
    let s = service(&compose, &name);
    let words = command(s);
    let config_at = words
        .iter()
        .position(|w| w == "--config")
        .and_then(|i| words.get(i + 1))
        .expect("the pgrelay service runs with --config FILE");
    assert_eq!(
        mounted_at(s, PGRELAY_CONFIG).as_ref(),
        Some(config_at),
        "{PGRELAY_CONFIG} is mounted where --config points"
    );
    let ports = published(s);
    let listen = c.proxy.listen;
    let metrics = c.metrics.listen.expect("metrics are served");
    for (what, a) in [("listen", listen), ("metrics", metrics)] {
        assert!(
            a.ip().is_unspecified(),
            "{what} = {a}: must listen on every interface to be reachable in the container"
        );
        assert!(
            ports.contains_key(&a.port()),
            "{what} port {} is not published: {ports:?}",
            a.port()
        );
    }
    // The Dockerfile's default command is the same file, and it exposes the same ports.
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains(&format!("\"--config\", \"{config_at}\"")),
        "the Dockerfile's CMD runs {config_at}"
    );
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([listen.port(), metrics.port()]),
        "Dockerfile EXPOSE"
    );
}

#[test]
fn the_image_has_the_client_tools_bootstrap_needs() {
    let c = config();
    let compose = compose();
    let dockerfile = read("Dockerfile");
    let client: u32 = dockerfile
        .split_whitespace()
        .find_map(|w| w.strip_prefix("postgresql-client-"))
        .expect("the Dockerfile installs postgresql-client-N")
        .parse()
        .unwrap();
    if c.replication.mode != ReplicationMode::Physical {
        assert_eq!(
            c.replication.pg_bin_dir.as_deref(),
            Some(std::path::Path::new(&format!(
                "/usr/lib/postgresql/{client}/bin"
            ))),
            "pg_bin_dir is where Debian's postgresql-client-{client} puts pg_dump and psql"
        );
    }
    // pg_dump must be at least the leader's major version.
    for node in &c.nodes {
        let image = service(&compose, &node.host)["image"].as_str().unwrap();
        let server: u32 = image
            .trim_start_matches("postgres:")
            .split(['.', '-'])
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("image {image:?}: pin the major version"));
        assert!(
            client >= server,
            "pg_dump {client} cannot dump Postgres {server} (node {:?})",
            node.name
        );
    }
    // Files the source includes at compile time are copied into the build stage.
    for dir in compile_time_includes() {
        assert!(
            dockerfile.contains(&format!("COPY {dir} ")),
            "src includes files from {dir}/, which the Dockerfile does not copy"
        );
        let ignore = read(".dockerignore");
        assert!(
            !ignore.lines().any(|l| l.trim_end_matches('/') == dir),
            ".dockerignore leaves out {dir}/"
        );
    }
}

/// Top-level directories other than `src` that `include_str!`/`include_bytes!` read from.
fn compile_time_includes() -> BTreeSet<String> {
    let mut dirs = BTreeSet::new();
    let mut stack = vec![repo_path("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let parts = ["include_str!(\"", "include_bytes!(\""]
                .into_iter()
                .flat_map(|macro_call| text.split(macro_call).skip(1));
            for part in parts {
                let rel = part.split('"').next().unwrap();
                let target = path.parent().unwrap().join(rel);
                let target = std::fs::canonicalize(&target)
                    .unwrap_or_else(|e| panic!("{}: {rel}: {e}", path.display()));
                let root = std::fs::canonicalize(repo_path("")).unwrap();
                let top = target
                    .strip_prefix(&root)
                    .unwrap()
                    .components()
                    .next()
                    .unwrap()
                    .as_os_str()
                    .to_string_lossy()
                    .into_owned();
                if top != "src" {
                    dirs.insert(top);
                }
            }
        }
    }
    dirs
}

#[test]
fn prometheus_scrapes_the_metrics_port_of_the_pgrelay_service() {
    let c = config();
    let compose = compose();
    let pgrelay = pgrelay_service(&compose);
    let metrics = c.metrics.listen.expect("metrics are served");
    let name = service_by_image(&compose, "prom/prometheus");
    let s = service(&compose, &name);
    let config_file = command(s)
        .iter()
        .find_map(|w| w.strip_prefix("--config.file=").map(str::to_owned))
        .unwrap_or_else(|| "/etc/prometheus/prometheus.yml".into());
    assert_eq!(
        mounted_at(s, "deploy/prometheus.yml"),
        Some(config_file),
        "deploy/prometheus.yml is mounted where Prometheus reads its config"
    );
    let prom = yaml("deploy/prometheus.yml");
    let targets: Vec<String> = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|sc| sc["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert!(
        targets.contains(&format!("{pgrelay}:{}", metrics.port())),
        "Prometheus scrapes {targets:?}, not {pgrelay}:{}",
        metrics.port()
    );
}

/// Grafana's service, its provisioning directory on the host and the datasource file.
#[test]
fn grafana_is_provisioned_with_the_prometheus_service_and_the_dashboard() {
    let compose = compose();
    let prometheus = service_by_image(&compose, "prom/prometheus");
    let prom_port = command(service(&compose, &prometheus))
        .iter()
        .find_map(|w| w.strip_prefix("--web.listen-address="))
        .map_or(9090, |a| a.rsplit(':').next().unwrap().parse().unwrap());
    let name = service_by_image(&compose, "grafana/grafana");
    let g = service(&compose, &name);
    let provisioning = env(g, "GF_PATHS_PROVISIONING").unwrap_or("/etc/grafana/provisioning");
    assert_eq!(
        mounted_at(g, "grafana/provisioning").as_deref(),
        Some(provisioning),
        "grafana/provisioning is mounted where Grafana reads provisioning"
    );

    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let sources = ds["datasources"].as_array().unwrap();
    assert_eq!(sources.len(), 1, "one data source");
    let source = &sources[0];
    assert_eq!(source["type"], json!("prometheus"));
    assert_eq!(
        source["url"],
        json!(format!("http://{prometheus}:{prom_port}")),
        "the data source is the compose Prometheus"
    );
    let uid = source["uid"]
        .as_str()
        .expect("the data source has a fixed uid");

    let dash = grafana::dashboard();
    assert_eq!(
        grafana::datasource_uids(&dash),
        BTreeSet::from([uid.to_owned()]),
        "every panel, target and variable uses the provisioned data source"
    );
    let dash_uid = dash["uid"].as_str().expect("the dashboard has a fixed uid");
    assert!(!dash_uid.is_empty());

    let providers = yaml("grafana/provisioning/dashboards/pgrelay.yml");
    let providers = providers["providers"].as_array().unwrap();
    assert_eq!(providers.len(), 1, "one dashboard provider");
    let path = providers[0]["options"]["path"].as_str().unwrap();
    let dashboards_dir = std::path::Path::new(grafana::DASHBOARD)
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        mounted_at(g, &dashboards_dir).as_deref(),
        Some(path),
        "{dashboards_dir} is mounted where the provider loads dashboards from"
    );
    if let Some(home) = env(g, "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        let file = home
            .strip_prefix(&format!("{path}/"))
            .unwrap_or_else(|| panic!("home dashboard {home} is outside {path}"));
        assert!(
            repo_path(&format!("{dashboards_dir}/{file}")).is_file(),
            "home dashboard {home}: no {dashboards_dir}/{file}"
        );
    }
    assert_eq!(
        env(g, "GF_AUTH_ANONYMOUS_ORG_ROLE").unwrap_or("Viewer"),
        "Viewer",
        "anonymous visitors may only view"
    );
}

/// Metric families pgrelay exports, with their type and label names, from a real registry.
fn exported() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let metrics = pgrelay::metrics::Metrics::new(&config());
    let text = metrics.render();
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (name, kind) = (w.next().unwrap(), w.next().unwrap());
            out.entry(name.to_owned()).or_default().0 = kind.to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.split(' ').next().unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| out.contains_key(*b)))
                .unwrap_or(name);
            let entry = out.entry(family.to_owned()).or_default();
            for pair in labels.trim_end_matches('}').split(',') {
                if let Some((k, _)) = pair.split_once('=') {
                    entry.1.insert(k.to_owned());
                }
            }
        }
    }
    out
}

/// `pub const NAME: &str = "pgrelay_...";` in src/metrics.rs.
fn metric_constants() -> BTreeSet<String> {
    read("src/metrics.rs")
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("pub const ")?;
            let value = l.split('"').nth(1)?;
            value.starts_with("pgrelay_").then(|| value.to_owned())
        })
        .collect()
}

#[test]
fn dashboard_metrics_and_labels_are_the_ones_pgrelay_exports() {
    let dash = grafana::dashboard();
    let constants = metric_constants();
    let exported = exported();
    let mut problems = Vec::new();
    let exprs: Vec<_> = grafana::panel_exprs(&dash)
        .into_iter()
        .chain(grafana::variable_queries(&dash))
        .collect();
    assert!(
        exprs.len() >= 20,
        "the dashboard has its panels: {}",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = grafana::metric_names(&e.expr);
        if names.is_empty() {
            problems.push(format!("{}: uses no pgrelay metric: {}", e.place, e.expr));
        }
        let mut labels = BTreeSet::from(["instance".to_owned(), "job".to_owned()]);
        for name in &names {
            let (base, suffix) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).map(|b| (b, *s)))
                .filter(|(b, _)| constants.contains(*b))
                .unwrap_or((name.as_str(), ""));
            if !constants.contains(base) {
                problems.push(format!(
                    "{}: {name} is not a constant in src/metrics.rs",
                    e.place
                ));
                continue;
            }
            used.insert(base.to_owned());
            let Some((kind, names)) = exported.get(base) else {
                problems.push(format!("{}: {base} is not exported", e.place));
                continue;
            };
            if !suffix.is_empty() && kind != "histogram" {
                problems.push(format!("{}: {name}: {base} is a {kind}", e.place));
            }
            if kind == "histogram" && suffix.is_empty() {
                problems.push(format!("{}: {name} is a histogram: use _bucket", e.place));
            }
            if suffix == "_bucket" {
                labels.insert("le".into());
            }
            labels.extend(names.iter().cloned());
        }
        for label in grafana::label_names(&e.expr) {
            if !labels.contains(&label) {
                problems.push(format!(
                    "{}: no metric there has the label {label:?}",
                    e.place
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Everything an operator is told about in README's Metrics table has a panel.
    let readme = read("README.md");
    let missing: Vec<_> = constants
        .iter()
        .filter(|c| readme.contains(&format!("`{c}")) && !used.contains(*c))
        .filter(|c| {
            ![
                "pgrelay_leader_position",
                "pgrelay_follower_applied_position",
            ]
            .contains(&c.as_str())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics in README without a panel: {missing:?}"
    );
}

#[test]
fn the_metric_names_and_labels_are_read_from_expressions() {
    // The parsing the other tests rely on, on expressions of the dashboard's shapes.
    let e = "histogram_quantile(0.95, sum by (route, le) (rate(pgrelay_query_duration_seconds_bucket{instance=~\"$instance\"}[$__rate_interval])))";
    assert_eq!(
        grafana::metric_names(e),
        BTreeSet::from(["pgrelay_query_duration_seconds_bucket".to_owned()])
    );
    assert_eq!(
        grafana::label_names(e),
        BTreeSet::from(["route".into(), "le".into(), "instance".into()])
    );
    assert_eq!(
        grafana::substitute(e, &["instance".into()], "15s"),
        "histogram_quantile(0.95, sum by (route, le) (rate(pgrelay_query_duration_seconds_bucket{instance=~\".*\"}[15s])))"
    );
    assert!(grafana::metric_names("sum(rate(xpgrelay_x[1m]))").is_empty());
}

//! The house's layering, checked over the source: the core of the runtime (activation,
//! instances, `Ctx`, storage, schedules, the output gate) names nothing of the WebSocket wing
//! (the sockets, their frames, calls in flight, the outbound queues, the HTTP routes): it reaches
//! connections only through the delivery port (`port.rs`); the wing reaches the core only
//! through the same module (its `Door`, and the vocabulary both share). `runtime.rs` is where
//! both are put together, and `server.rs` (the router) hands the wing its upgrades. Run it alone
//! with `cargo test --test layering`.

use std::path::Path;

/// The core's modules.
const CORE: &[&str] = &[
    "address",
    "agent",
    "alarms",
    "backup",
    "catalog",
    "inspect",
    "metrics",
    "clock",
    "conn",
    "context",
    "database",
    "error",
    "gate",
    "instance",
    "lock",
    "port",
    "registry",
    "replica",
    "cluster",
    "schedule",
    "spares",
    "storage",
    "telemetry",
    "stream",
    "vfs",
];
/// The wing (`ws/`: sockets, frames, calls in flight, outbound queues), the HTTP routes (the
/// admin ones too), their origins check and the accept loop.
const WING: &[&str] = &[
    "ws",
    "connection",
    "inflight",
    "outbound",
    "server",
    "admin",
    "origins",
    "front",
    "forward",
];

/// The files of `module`: `module.rs`, or every file of the folder `module/`.
fn sources(src: &Path, module: &str) -> Vec<(String, String)> {
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        let text = std::fs::read_to_string(&file).unwrap();
        return vec![(format!("{module}.rs"), text)];
    }
    let dir = std::fs::read_dir(src.join(module)).unwrap_or_else(|e| panic!("{module}: {e}"));
    dir.map(|entry| {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        (
            format!("{module}/{name}"),
            std::fs::read_to_string(&path).unwrap(),
        )
    })
    .collect()
}

#[test]
fn the_core_names_nothing_of_the_websocket_wing() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/src");
    let mut offenses = Vec::new();
    for module in CORE {
        for (file, text) in sources(&src, module) {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for wing in WING {
                    let named = code.match_indices(&format!("{wing}::")).any(|(at, _)| {
                        // `crate::ws::`, or `ws::` in a `use crate::{..}` list; not `some_ws::` nor
                        // another crate's `axum::extract::ws::`.
                        let before = &code[..at];
                        before.ends_with("crate::")
                            || !(before.ends_with("::")
                                || before.ends_with(|c: char| c.is_alphanumeric() || c == '_'))
                    });
                    if named {
                        offenses.push(format!("{file}:{}: {}", n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        offenses.is_empty(),
        "the core names the WebSocket wing (use the delivery port):\n{}",
        offenses.join("\n")
    );
    // And every module is in one of the two, or is the composition root.
    for entry in std::fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let module = name.strip_suffix(".rs").unwrap_or(&name);
        let known = CORE.contains(&module)
            || WING.contains(&module)
            || ["lib", "runtime", "testing"].contains(&module);
        assert!(
            known,
            "{name}: say whether it is core or wing in tests/layering.rs"
        );
    }
}

/// What the wing (`ws/`) may name of the rest of the crate: the port, the lock helper, and the
/// metrics (which both sides count into).
const WING_MAY_NAME: &[&str] = &["port", "lock", "metrics"];

#[test]
fn the_websocket_wing_reaches_the_core_only_through_the_port() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/src/ws");
    let mut offenses = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        files += 1;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            // `crate::x::..` names module `x`; a `crate::{..}` list is written per module instead,
            // so that this stays a check over single lines.
            for (at, _) in code.match_indices("crate::") {
                let after = &code[at + "crate::".len()..];
                let module: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !WING_MAY_NAME.contains(&module.as_str()) {
                    offenses.push(format!(
                        "ws/{}:{}: {}",
                        path.file_name().unwrap().to_string_lossy(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
            // Nor may it climb out of `ws/` by `super::super::..` (tests inside a module of the
            // wing reach its siblings that way: two levels, not three).
            if code.contains("super::super::super::") {
                offenses.push(format!("ws: {}", line.trim()));
            }
        }
    }
    assert!(files >= 5, "the wing's files were not found in {dir:?}");
    assert!(
        offenses.is_empty(),
        "the WebSocket wing names the core other than through crate::port:\n{}",
        offenses.join("\n")
    );
}

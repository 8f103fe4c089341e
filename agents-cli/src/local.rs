//! The commands on a data dir: `ls`, `show`, `sql`, `retry`, `discard`, `rm`.

use std::time::SystemTime;

use agents::{inspect::DataDir, AgentInfo};
use serde_json::{json, Value};

use crate::Failed;

fn open(dir: &str) -> Result<DataDir, Failed> {
    DataDir::open(dir).map_err(|e| e.to_string())
}

/// `t` as UTC, to the second.
fn time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn info_json(a: &AgentInfo) -> Value {
    json!({
        "class": a.class, "name": a.name, "id": a.id, "created": time(a.created),
        "last_active": time(a.last_active), "size": a.size, "schedules": a.schedules,
        "dead_letters": a.dead_letters,
    })
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values print")
    );
}

/// `agents ls DIR [CLASS]`: the classes and their agents, with the catalog's columns.
pub fn ls(dir: &str, only: Option<&str>, as_json: bool) -> Result<(), Failed> {
    let dir = open(dir)?;
    if let Some(holder) = dir.served_by() {
        eprintln!("(a runtime serves this data dir, {holder}: live agents' figures are those of their last close)");
    }
    let classes = dir.classes().map_err(|e| e.to_string())?;
    let mut listed = Vec::new();
    for (class, _) in classes.iter().filter(|(c, _)| only.is_none_or(|o| o == c)) {
        listed.extend(
            dir.agents(class, None, usize::MAX)
                .map_err(|e| e.to_string())?,
        );
    }
    if as_json {
        print_json(&Value::Array(listed.iter().map(info_json).collect()));
        return Ok(());
    }
    for (class, count) in classes.iter().filter(|(c, _)| only.is_none_or(|o| o == c)) {
        println!(
            "{class}: {count} agent{}",
            if *count == 1 { "" } else { "s" }
        );
    }
    if !listed.is_empty() {
        println!();
        println!(
            "{:<32} {:<20} {:<20} {:>10} {:>9} {:>12}  ID",
            "AGENT", "CREATED", "LAST ACTIVE", "BYTES", "SCHEDULES", "DEAD LETTERS"
        );
    }
    for a in &listed {
        println!(
            "{:<32} {:<20} {:<20} {:>10} {:>9} {:>12}  {}",
            format!("{}/{}", a.class, a.name),
            time(a.created),
            time(a.last_active),
            a.size,
            a.schedules,
            a.dead_letters,
            a.id
        );
    }
    Ok(())
}

/// `agents show DIR CLASS/NAME`: everything the agent's database holds, table by table.
pub fn show(dir: &str, (class, name): (&str, &str), as_json: bool) -> Result<(), Failed> {
    let dir = open(dir)?;
    let db = dir.agent(class, name).map_err(|e| e.to_string())?;
    let e = |e: agents::Error| e.to_string();
    // The catalog's times, else the file's.
    let info = match dir.info(class, name).map_err(e)? {
        Some(info) => info,
        None => db.info().map_err(e)?,
    };
    let schedules: Vec<Value> = db
        .schedules()
        .map_err(e)?
        .iter()
        .map(|s| {
            json!({
                "id": s.id, "method": s.method, "kind": format!("{:?}", s.kind), "key": s.key,
                "next": time(s.next), "attempts": s.attempts, "last_error": s.last_error,
                "target": s.target.as_ref().map(ToString::to_string),
            })
        })
        .collect();
    let dead_letters: Vec<Value> = db.dead_letters().map_err(e)?.iter().map(|d| {
        json!({
            "id": d.id, "method": d.method, "kind": format!("{:?}", d.kind), "attempts": d.attempts,
            "error": d.error, "failed": time(d.failed),
            "target": d.target.as_ref().map(ToString::to_string),
        })
    }).collect();
    let connections: Vec<Value> = db
        .connections()
        .map_err(e)?
        .iter()
        .map(|c| {
            json!({
                "id": c.id, "principal": c.principal, "protocol": c.protocol, "tags": c.tags,
                "state": c.state,
            })
        })
        .collect();
    let kv: serde_json::Map<String, Value> = db.kv().map_err(e)?.into_iter().collect();
    let tables: serde_json::Map<String, Value> = db
        .tables()
        .map_err(e)?
        .into_iter()
        .map(|(t, n)| (t, n.into()))
        .collect();
    let report = json!({
        "agent": info_json(&info), "kv": kv, "state": db.state().map_err(e)?,
        "schedules": schedules, "dead_letters": dead_letters, "connections": connections,
        "tables": tables,
    });
    if as_json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "{class}/{name}  id {}  {} bytes  created {}  last active {}",
        info.id,
        info.size,
        time(info.created),
        time(info.last_active)
    );
    let section = |title: &str, items: &[Value], line: &dyn Fn(&Value) -> String| {
        println!("\n{title} ({})", items.len());
        for item in items {
            println!("  {}", line(item));
        }
    };
    let kv: Vec<Value> = kv.into_iter().map(|(k, v)| json!([k, v])).collect();
    section("kv", &kv, &|p| {
        format!("{} = {}", p[0].as_str().unwrap_or_default(), p[1])
    });
    println!("\nstate\n  {}", report["state"]);
    section("schedules", &schedules, &|s| {
        format!(
            "#{} {} ({}) next {}, {} failed attempts{}",
            s["id"],
            s["method"].as_str().unwrap_or_default(),
            s["kind"].as_str().unwrap_or_default(),
            s["next"].as_str().unwrap_or_default(),
            s["attempts"],
            s["last_error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    });
    section("dead letters", &dead_letters, &|d| {
        format!(
            "#{} {} ({}) failed {} after {} attempts: {}",
            d["id"],
            d["method"].as_str().unwrap_or_default(),
            d["kind"].as_str().unwrap_or_default(),
            d["failed"].as_str().unwrap_or_default(),
            d["attempts"],
            d["error"].as_str().unwrap_or_default()
        )
    });
    section("connections", &connections, &|c| {
        format!(
            "{} {}",
            c["id"].as_str().unwrap_or_default(),
            json!({"principal": c["principal"], "protocol": c["protocol"], "tags": c["tags"], "state": c["state"]})
        )
    });
    let tables: Vec<Value> = tables.into_iter().map(|(t, n)| json!([t, n])).collect();
    section("tables", &tables, &|t| {
        format!("{:<32} {} rows", t[0].as_str().unwrap_or_default(), t[1])
    });
    Ok(())
}

/// `agents sql DIR CLASS/NAME "SELECT .."`: one read-only statement's rows, tab-separated
/// under their column names (or as JSON objects).
pub fn sql(dir: &str, (class, name): (&str, &str), sql: &str, as_json: bool) -> Result<(), Failed> {
    let dir = open(dir)?;
    let db = dir.agent(class, name).map_err(|e| e.to_string())?;
    let (columns, rows) = db.query(sql).map_err(|e| e.to_string())?;
    if as_json {
        let rows = rows
            .into_iter()
            .map(|row| Value::Object(columns.iter().cloned().zip(row).collect()));
        print_json(&Value::Array(rows.collect()));
        return Ok(());
    }
    println!("{}", columns.join("\t"));
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        println!("{}", cells.join("\t"));
    }
    Ok(())
}

fn dead_letter_id(id: &str) -> Result<i64, Failed> {
    id.parse()
        .map_err(|_| format!("`{id}` is not a dead letter's id (a number: see `agents show`)"))
}

/// `agents retry DIR CLASS/NAME ID`.
pub fn retry(dir: &str, (class, name): (&str, &str), id: &str) -> Result<(), Failed> {
    let id = dead_letter_id(id)?;
    let dir = open(dir)?;
    let locked = dir.lock().map_err(refused)?;
    match locked
        .retry_dead_letter(class, name, id)
        .map_err(|e| e.to_string())?
    {
        Some(schedule) => {
            println!("dead letter #{id} of {class}/{name} is schedule #{schedule} again, due now (it runs when a runtime serves the data dir)");
            Ok(())
        }
        None => Err(format!("{class}/{name} has no dead letter #{id}")),
    }
}

/// `agents discard DIR CLASS/NAME ID`.
pub fn discard(dir: &str, (class, name): (&str, &str), id: &str) -> Result<(), Failed> {
    let id = dead_letter_id(id)?;
    let dir = open(dir)?;
    let locked = dir.lock().map_err(refused)?;
    if locked
        .discard_dead_letter(class, name, id)
        .map_err(|e| e.to_string())?
    {
        println!("dead letter #{id} of {class}/{name} discarded");
        Ok(())
    } else {
        Err(format!("{class}/{name} has no dead letter #{id}"))
    }
}

/// `agents rm DIR CLASS/NAME`.
pub fn rm(dir: &str, (class, name): (&str, &str)) -> Result<(), Failed> {
    let dir = open(dir)?;
    let locked = dir.lock().map_err(refused)?;
    locked.remove(class, name).map_err(|e| e.to_string())?;
    println!("{class}/{name} removed");
    Ok(())
}

/// `agents backup DIR DEST`.
pub fn backup(dir: &str, dest: &str) -> Result<(), Failed> {
    let dir = open(dir)?;
    let locked = dir.lock().map_err(|e| match e {
        agents::Error::DataDirInUse { .. } => format!(
            "{e}: a runtime that serves its data dir backs it up itself (`agents backup URL DEST` through its admin routes, or Runtime::backup); this form copies a data dir no runtime serves"
        ),
        e => e.to_string(),
    })?;
    let report = locked.backup(dest.as_ref()).map_err(|e| e.to_string())?;
    println!(
        "backed up {} agents ({} bytes) into {dest}",
        report.agents, report.bytes
    );
    Ok(())
}

/// `agents restore BACKUP DIR`.
pub fn restore(backup: &str, dir: &str) -> Result<(), Failed> {
    let report =
        agents::inspect::restore(backup.as_ref(), dir.as_ref()).map_err(|e| e.to_string())?;
    println!(
        "restored {} agents ({} bytes) into {dir}",
        report.agents, report.bytes
    );
    Ok(())
}

/// Why a change was refused: a runtime serves the data dir.
fn refused(e: agents::Error) -> Failed {
    match e {
        agents::Error::DataDirInUse { .. } => format!(
            "{e}: changes are made only while no runtime serves it (it could be changing the same database); stop it first, or make the change through the application"
        ),
        e => e.to_string(),
    }
}

//! TypeScript declarations generated from an agent's Rust definitions (`#[agent(typescript)]`,
//! types from ts-rs) type-check a client of `agents.js` with `tsc`, and catch a wrong argument.

use std::path::Path;

use agents::prelude::*;
use serde::{Deserialize, Serialize};
use ts_rs::TS;

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
pub struct Item {
    pub sku: String,
    pub count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShopEvent {
    Added { sku: String, total: i64 },
    Cleared,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, TS)]
pub struct Basket {
    pub items: Vec<Item>,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error, TS)]
pub enum ShopError {
    #[error("sold out: {0}")]
    SoldOut(String),
}

#[derive(Default)]
pub struct Shop;
impl Agent for Shop {}

#[agent(typescript, state = "Basket", event = "ShopEvent")]
impl Shop {
    /// Adds an item; returns how many items the basket holds.
    #[callable]
    pub async fn add(&mut self, _ctx: &mut Ctx<Self>, item: Item) -> Result<i64, ShopError> {
        Ok(i64::from(item.count))
    }

    #[callable]
    pub async fn clear(&mut self, _ctx: &mut Ctx<Self>) {}

    #[callable]
    pub async fn find(
        &mut self,
        _ctx: &mut Ctx<Self>,
        sku: String,
        limit: Option<u8>,
    ) -> Vec<Item> {
        let _ = (sku, limit);
        Vec::new()
    }
}

/// `tsc`, as `scripts/setup` installs it.
fn tsc() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/node_modules/.bin/tsc")
}

fn check(dir: &Path, file: &str) -> (bool, String) {
    let output = std::process::Command::new(tsc())
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "es2022",
            "--moduleResolution",
            "bundler",
            "--lib",
            "es2022,dom",
            file,
        ])
        .current_dir(dir)
        .output()
        .expect("tsc runs (scripts/setup installs it under target/tools)");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), out)
}

#[test]
fn generated_declarations_type_check_a_client_and_catch_a_wrong_argument() {
    assert!(
        tsc().exists(),
        "no tsc at {}: run scripts/setup",
        tsc().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/js");
    std::fs::copy(js.join("agents.js"), dir.path().join("agents.js")).unwrap();
    std::fs::copy(js.join("agents.d.ts"), dir.path().join("agents.d.ts")).unwrap();
    let declarations = ShopClient::typescript();
    assert!(
        declarations
            .contains(r#""add": { args: [item: Item]; result: number; error: ShopError };"#),
        "{declarations}"
    );
    assert!(
        declarations.contains("export type Item = "),
        "{declarations}"
    );
    std::fs::write(dir.path().join("shop.d.ts"), &declarations).unwrap();
    let client = r#"
import { connect, AgentError } from "./agents.js";
import type { Methods, Event, State } from "./shop.js";

export async function main(url: string): Promise<number> {
  const shop = await connect<Methods, Event, State>(url);
  shop.on("event", (e) => {
    if (e.type === "added") console.log(e.sku, e.total);
  });
  shop.on("state", (s) => console.log(s.items.length));
  const found = await shop.call("find", ["tea", null]);
  const first: string | undefined = found[0]?.sku;
  console.log(first);
  await shop.call("clear", []);
  try {
    return await shop.call("add", [{ sku: "tea", count: 2 }]);
  } catch (e) {
    if (e instanceof AgentError) console.log(e.kind);
    return 0;
  }
}
"#;
    std::fs::write(dir.path().join("ok.ts"), client).unwrap();
    let (ok, out) = check(dir.path(), "ok.ts");
    assert!(ok, "the client does not type-check:\n{out}\n{declarations}");

    let wrong = client.replace(r#"count: 2"#, r#"count: "two""#);
    std::fs::write(dir.path().join("wrong.ts"), wrong).unwrap();
    let (ok, out) = check(dir.path(), "wrong.ts");
    assert!(!ok, "a string count passed the type check");
    assert!(
        out.contains("Type 'string' is not assignable to type 'number'"),
        "{out}"
    );

    let unknown = client.replace(r#"shop.call("clear""#, r#"shop.call("clean""#);
    std::fs::write(dir.path().join("unknown.ts"), unknown).unwrap();
    assert!(
        !check(dir.path(), "unknown.ts").0,
        "an unknown method passed the type check"
    );
}

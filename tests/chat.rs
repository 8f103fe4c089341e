//! The chat example, the main one: its page in real headless Chromium (two pages chat, a
//! reload gets the history, the CLI client joins in; a screenshot is written to
//! `target/chat-page.png`), and its room on a manual clock (purged after 30 idle minutes).

mod common;

#[path = "../examples/chat.rs"]
#[allow(dead_code)]
mod chat;

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use chat::{ChatRoom, IDLE};
use tokio::io::AsyncBufReadExt;

/// The browser: `$CHROMIUM`, or Debian's `chromium` (installed by `scripts/setup`).
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_chats_in_a_real_browser_with_another_page_and_the_cli() {
    let browser = chromium();
    assert!(
        std::path::Path::new(&browser).exists(),
        "no browser at {browser}: run scripts/setup (it installs Debian's chromium), or set CHROMIUM"
    );
    let exe = common::example_binary("chat");
    let dir = tempfile::tempdir().unwrap();
    let mut server = tokio::process::Command::new(&exe)
        .args(["serve", "--addr", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the server says ready");
        if let Some(url) = line.strip_prefix("ready ") {
            break url.to_owned();
        }
    };
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
    let screenshot = format!("{target}/chat-page.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/chat/page.test.mjs");
    let node = tokio::process::Command::new("node")
        .args(["--experimental-websocket", "--test", script])
        .env("CHAT_URL", &url)
        .env("CHAT_BIN", &exe)
        .env("CHROMIUM", &browser)
        .env("SCREENSHOT", &screenshot)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), node)
        .await
        .expect("the page tests ended within 3 minutes")
        .expect("Node.js (`node`, version 20 or later) drives the browser");
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    println!("{out}\n{err}");
    assert!(
        output.status.success(),
        "the page tests failed:\n{out}\n{err}"
    );
    assert!(out.contains("# fail 0"), "{out}");
    let png = std::fs::read(&screenshot).expect("a screenshot of the page");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
}

#[tokio::test]
async fn a_room_forgets_after_thirty_quiet_minutes() {
    let rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(SystemTime::now()))
            .agent::<ChatRoom>(),
    )
    .unwrap();
    let room = rt.agent::<ChatRoom>("quiet");
    room.post("one".into()).await.unwrap();
    rt.advance(IDLE - Duration::from_secs(60)).await;
    room.post("two".into()).await.unwrap(); // pushes the purge back
    rt.advance(IDLE - Duration::from_secs(60)).await;
    assert_eq!(room.history().await.unwrap().len(), 2);
    rt.advance(Duration::from_secs(120)).await;
    assert_eq!(room.history().await.unwrap(), []);
    // A message of nobody's (HTTP, in-process) is from `api`; an empty one is refused.
    assert_eq!(room.post("three".into()).await.unwrap().from, "api");
    assert!(room.post("  ".into()).await.is_err());
}

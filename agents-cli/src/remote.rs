//! The commands on a running server: `call` and `tail`, over a WebSocket with the JSON codec,
//! and `backup`, over HTTP (`POST /admin/backup`). A token in `AGENTS_TOKEN` is sent as
//! `Authorization: Bearer ..` (what the server's admission or admin hook checks).

use std::sync::Arc;

use agents_client::{ClientCore, Codec, ConnectOptions, RpcError, WsTransport};
use serde_json::Value;

use crate::Failed;

/// The WebSocket URL of `class`/`name` on the server at `base` (`http://`, `https://`, `ws://`
/// or `wss://`, with or without a trailing slash).
fn agent_url(base: &str, (class, name): (&str, &str)) -> Result<String, Failed> {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        return Err(format!(
            "`{base}` is not a server's URL (http://HOST:PORT, say)"
        ));
    };
    Ok(format!("{base}/agents/{}/{}", escape(class), escape(name)))
}

/// `segment` as one path segment: every byte but the unreserved ones percent-encoded.
fn escape(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A current-thread tokio runtime for one command.
fn tokio() -> Result<tokio::runtime::Runtime, Failed> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))
}

/// The token to send, if the user gave one.
fn token() -> Option<String> {
    std::env::var("AGENTS_TOKEN").ok().filter(|t| !t.is_empty())
}

async fn connect(url: &str) -> Result<ClientCore, Failed> {
    let mut options = ConnectOptions::new().codec(Codec::Json);
    if let Some(token) = token() {
        options = options.bearer(token);
    }
    let transport = WsTransport::connect_with(url, options)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ClientCore::new(Arc::new(transport)))
}

/// `agents call URL CLASS/NAME METHOD [ARGS]`: prints the reply as JSON; an error reply is
/// printed to stderr with its kind, and fails.
pub fn call(base: &str, agent: (&str, &str), method: &str, args: &str) -> Result<(), Failed> {
    let url = agent_url(base, agent)?;
    let args: Value = serde_json::from_str(args).map_err(|e| {
        format!("the arguments are not JSON ({e}): give a JSON array, as in '[1, \"two\"]'")
    })?;
    if !args.is_array() {
        return Err(format!(
            "the arguments must be a JSON array, one element per parameter, not {args}"
        ));
    }
    // The client names methods by `&'static str` (generated clients' names are constants).
    let method: &'static str = Box::leak(method.to_owned().into_boxed_str());
    tokio()?.block_on(async {
        let client = connect(&url).await?;
        let reply: Result<Value, RpcError<Value>> = client.call(method, args).await;
        match reply {
            Ok(value) => {
                println!("{value}");
                Ok(())
            }
            Err(RpcError::App(error)) => Err(format!("the method failed: {error}")),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// `agents tail URL CLASS/NAME`: prints each event the agent broadcasts, one JSON line each,
/// until the server goes for good or the user stops it (Ctrl-C).
pub fn tail(base: &str, agent: (&str, &str)) -> Result<(), Failed> {
    let url = agent_url(base, agent)?;
    tokio()?.block_on(async {
        let client = connect(&url).await?;
        eprintln!("(listening to {}/{}; Ctrl-C stops)", agent.0, agent.1);
        let mut events = client.events::<Value>();
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => println!("{event}"),
                    Some(Err(e)) => eprintln!("({e})"),
                    None => return Err("the connection ended".to_owned()),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}

/// `agents backup URL DEST`: the server at `URL` backs its data dir up into `DEST`, a directory
/// on its own machine, while it serves (its admin routes must be on). Prints the server's
/// report.
pub fn backup(base: &str, dest: &str) -> Result<(), Failed> {
    let Some(rest) = base.strip_prefix("http://") else {
        return Err(format!(
            "`{base}`: a backup is asked for over plain HTTP (http://HOST:PORT); for a server \
             behind TLS, run this on its machine against its own port"
        ));
    };
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_end_matches('/');
    let path = if prefix.is_empty() {
        "/admin/backup".to_owned()
    } else {
        format!("/{prefix}/admin/backup")
    };
    let body = serde_json::json!({ "dest": dest }).to_string();
    let auth = token().map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let response = tokio()?.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot reach {host}: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {host}: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("no answer from {host}: {e}"))?;
        Ok::<_, Failed>(String::from_utf8_lossy(&response).into_owned())
    })?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).unwrap_or_default();
    match status {
        "200" => {
            println!("{body}");
            Ok(())
        }
        "404" => Err(format!(
            "{base} has no admin routes (the server turns them on with Builder::admin)"
        )),
        _ => {
            let why = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.trim().to_owned());
            Err(format!("the server refused ({status}): {why}"))
        }
    }
}
